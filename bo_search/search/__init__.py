"""The search: the Ax driver (:mod:`.driver`), proposal strategies (:mod:`.strategies`,
:mod:`.thompson`), Ray workers (:mod:`.workers`), the CSV history (:mod:`.history`) and the runner
shared by the three search commands (:mod:`.runner`)."""
