import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import bo_search  # noqa: E402,F401  (offline environment first)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests use their own cache dir, except for the embedded model conversion which is shared
    (it costs ~25 s; BO_SEARCH_TEST_SHARED_CACHE=0 disables sharing)."""
    yield


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
