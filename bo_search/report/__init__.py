"""What a finished search is worth: the analysis of its history (:mod:`.analysis`), measured
baselines (:mod:`.baselines`), plots (:mod:`.plots`), the Markdown (:mod:`.markdown`) and the export
bundle (:mod:`.bundle`, in the formats of :mod:`.export` and :mod:`.gguf`), put together by
:mod:`.build`. ``python -m bo_search.report`` is :mod:`.cli`."""
