"""Per-layer sensitivity to quantization and allocation on it: FIT (:mod:`.fit`), Hessian trace
(:mod:`.hessian`) and measured (:mod:`.measured`) write the per-slot table (:mod:`.table`), cached on
disk (:mod:`.cache`); greedy and exact allocation (:mod:`.allocate`) turn it into seeds (:mod:`.seeds`).
``python -m bo_search.sensitivity`` is :mod:`.cli`."""
