import pytest

import bo_search  # noqa: F401  (offline environment first)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test, subprocesses included (they inherit the environment), uses a temporary cache
    root: text, tokens, sensitivity tables, bandwidth and lm_eval tasks never touch the user's
    cache, and no stale entry can make a test pass. The one expensive artefact, the dequantized
    embedded model (about 25 s), is converted once in the user's cache and linked in
    (BO_SEARCH_TEST_SHARED_CACHE=0: converted inside the temporary root instead)."""
    import os

    root = tmp_path_factory.mktemp("bo_search_cache")
    before = os.environ.get("BO_SEARCH_CACHE")
    if os.environ.get("BO_SEARCH_TEST_SHARED_CACHE", "1") != "0":
        from bo_search.model import _convert_gguf, resolve_checkpoint
        from bo_search.types import UserError

        try:
            src = _convert_gguf(resolve_checkpoint(None))
        except UserError:
            src = None  # the embedded model is not installed: tests that need it fail on their own
        if src is not None:
            (root / "models").mkdir()
            (root / "models" / src.name).symlink_to(src, target_is_directory=True)
    os.environ["BO_SEARCH_CACHE"] = str(root)
    try:
        yield root
    finally:
        if before is None:
            os.environ.pop("BO_SEARCH_CACHE", None)
        else:
            os.environ["BO_SEARCH_CACHE"] = before


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    from tiny import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny_llama"), "llama", n_layers=3)


@pytest.fixture(scope="session")
def tiny_ctx(tiny_llama):
    from bo_search.trial import EvalConfig, ModelContext

    return ModelContext(EvalConfig(checkpoint=str(tiny_llama), eval_text="pydoc", eval_tokens=256, heldout_tokens=256, max_seqlen=64))


@pytest.fixture(scope="session")
def real_ctx():
    from bo_search.trial import EvalConfig, ModelContext

    return ModelContext(EvalConfig(eval_tokens=1024, heldout_tokens=1024, max_seqlen=512))


@pytest.fixture(scope="session")
def tiny_search(tiny_llama, tmp_path_factory):
    """One search on the tiny model, run once as a user would (a subprocess): 5 trials on 2 workers
    with the default seeds. Tests that need a finished history (report, resume refusals, corrupt
    rows) copy it with ``tiny_search.copy_to(tmp_path)`` instead of each starting a search of their
    own (each costs a fresh interpreter, the torch/Ax imports and a Ray start)."""
    from clitools import SharedSearch, base_args, run_cli, tiny_space

    folder = tmp_path_factory.mktemp("tiny_search")
    space = tiny_space(folder / "space.json")
    r = run_cli(base_args(tiny_llama, space, folder / "h.csv", "--num_trials", "5", "--num_workers", "2"))
    return SharedSearch(folder, r)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A search run in this process through ``main(argv)`` sets torch to one thread for its driver
    (runner.run_search); the tests after it must not inherit that and run slower."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
