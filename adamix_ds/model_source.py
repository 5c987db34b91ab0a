"""One entrance for every kind of --model_name_or_path: where the base's config, weights and tokenizer come from.

A name is resolved once into a `ModelSource`: a built-in config (tiny:llama), a model directory, a GGUF file (or a
folder holding exactly one), a packaged model (smollm2:135m-instruct, a GGUF file inside an installed package) or a
hub name. Every consumer (preflight, the ZeRO-3 loader, the tokenizer, generation) asks the source instead of
telling the kinds apart itself, as transformers' from_pretrained keeps the choice of source at one entrance.

GGUF files (llama.cpp's format) are read by transformers with the `gguf` package and dequantized into an ordinary
model in the run's dtype. GGUF holds tensors and metadata only, no pickle, so it fits the safe-loading rule.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .builtin_models import PACKAGED_MODELS, builtin_config, is_builtin
from .config import ConfigError

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
GGUF_INSTALL = "pip install 'adamix_ds[gguf]'"


@dataclass(frozen=True)
class ModelSource:
    """Where a base model comes from. `location` is what from_pretrained is given (a directory or a hub name; a
    built-in's name); `gguf_file` names the GGUF file inside that directory."""

    location: str
    gguf_file: str | None = None
    builtin: bool = False

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def gguf_path(self) -> Path:
        return Path(self.location) / self.gguf_file

    def pretrained_options(self) -> dict:
        """from_pretrained's keyword arguments that pick the file (AutoConfig, AutoModel, AutoTokenizer)."""
        return {"gguf_file": self.gguf_file} if self.is_gguf else {}

    def config(self, trust_remote_code: bool = False, vocab_size: int = 8):
        """The model's config without its weights (a built-in's for `vocab_size`); a GGUF file's is read from its
        metadata and checked whole first, so a damaged file fails here in one line."""
        from transformers import AutoConfig

        if self.builtin:
            try:
                return builtin_config(self.location, vocab_size)
            except ValueError as error:
                raise ConfigError(f"--model_name_or_path: {error}") from None
        if self.is_gguf:
            with self.reading_gguf():
                config = AutoConfig.from_pretrained(self.location, **self.pretrained_options())
            drop_gguf_marker(config)
            return config
        return AutoConfig.from_pretrained(self.location, trust_remote_code=trust_remote_code)

    def load(self, dtype=None, **options):
        """The weights through from_pretrained (in `dtype`; None: transformers' default); a GGUF file dequantized,
        without the marker that stops transformers from saving it (its weights are ordinary tensors once read)."""
        from transformers import AutoModelForCausalLM

        if dtype is not None:
            options["dtype"] = dtype
        if not self.is_gguf:
            return AutoModelForCausalLM.from_pretrained(self.location, **options)
        options.pop("use_safetensors", None)  # the weights are in the GGUF file, which holds no pickle
        options.update(dequantizing_gguf_options())
        with self.reading_gguf():
            model = AutoModelForCausalLM.from_pretrained(self.location, **self.pretrained_options(), **options)
        drop_gguf_marker(model.config)
        model.hf_quantizer = None
        return model

    def load_tokenizer(self, trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        if not self.is_gguf:
            return AutoTokenizer.from_pretrained(self.location, trust_remote_code=trust_remote_code)
        with self.reading_gguf():
            return AutoTokenizer.from_pretrained(self.location, **self.pretrained_options())

    @contextlib.contextmanager
    def reading_gguf(self):
        """The file checked whole first; what transformers cannot read in it (an architecture it does not know, a
        missing key) becomes one line instead of a traceback."""
        check_gguf_contents(self.gguf_path)
        try:
            yield
        except (ValueError, KeyError, NotImplementedError) as error:
            raise ConfigError(f"--model_name_or_path {self.gguf_path}: transformers cannot read this GGUF model "
                              f"({error})") from None


def dequantizing_gguf_options() -> dict:
    """from_pretrained's option that unpacks every GGUF weight into a dense tensor. Newer transformers otherwise keep
    the weights of some architectures packed in GGUF blocks (when the `kernels` package is installed), which neither
    the adapters, ZeRO-3 nor the merge can work on, and warn about the dtype of every packed load; older ones know
    no such option and always dequantize."""
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def drop_gguf_marker(config) -> None:
    """transformers marks a model read from GGUF as quantized ("gguf"), which refuses save_pretrained and reads as a
    quantized checkpoint; the weights it holds are dequantized, so the marker goes."""
    marker = getattr(config, "quantization_config", None)
    if marker is not None and _quant_method(marker) == "gguf":
        del config.quantization_config


def _quant_method(marker) -> str:
    method = marker.get("quant_method") if isinstance(marker, dict) else getattr(marker, "quant_method", None)
    return str(getattr(method, "value", method))


def resolve_source(name: str) -> ModelSource:
    """The source a --model_name_or_path names; a bad GGUF choice is refused here in one line."""
    if is_builtin(name):
        return ModelSource(location=name, builtin=True)
    if name in PACKAGED_MODELS:
        return _gguf_source(packaged_model_file(name))
    path = Path(name)
    if path.suffix.lower() == GGUF_SUFFIX or (path.is_file() and _starts_with_magic(path)):
        return _gguf_source(path)
    if path.is_dir() and not any(path.glob("*.safetensors")):  # a GGUF repository may hold a config.json too
        found = sorted(path.glob(f"*{GGUF_SUFFIX}"))
        if len(found) == 1:
            return _gguf_source(found[0])
        if len(found) > 1:
            listed = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
            raise ConfigError(f"--model_name_or_path {name}: {len(found)} GGUF files ({listed}) and no choice "
                              f"made; name one, e.g. --model_name_or_path {found[0]}")
    return ModelSource(location=name)


def _gguf_source(file: Path) -> ModelSource:
    if not file.is_file():
        raise ConfigError(f"--model_name_or_path {file}: file not found")
    if not _starts_with_magic(file):
        raise ConfigError(f"--model_name_or_path {file}: not a GGUF file (it does not start with the GGUF magic "
                          "bytes)")
    require_gguf_reader()
    return ModelSource(location=str(file.parent), gguf_file=file.name)


def _starts_with_magic(file: Path) -> bool:
    with open(file, "rb") as handle:
        return handle.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading a GGUF model needs the gguf package: {GGUF_INSTALL}")


@functools.lru_cache(maxsize=None)
def check_gguf_contents(file: Path) -> None:
    """Every tensor the header lists lies within the file: a truncated download fails here, not mid-load (once
    per file and process: it maps the whole file)."""
    from gguf import GGUFReader

    try:
        GGUFReader(file)
    except (ValueError, IndexError, OSError, NotImplementedError) as error:
        raise ConfigError(f"--model_name_or_path {file}: a damaged or truncated GGUF file ({error})") from None


def packaged_model_file(name: str) -> Path:
    """The GGUF file of a packaged model inside its installed package, found without importing the package (the
    package's own __init__ may import what it does not ship)."""
    packaged = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(packaged.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"--model_name_or_path {name}: the model's package is not installed: {packaged.install}")
    for folder in spec.submodule_search_locations:
        file = Path(folder) / packaged.file
        if file.is_file():
            return file
    raise ConfigError(f"--model_name_or_path {name}: {packaged.file} is missing from the installed package "
                      f"{packaged.package}; reinstall it: {packaged.install} --force-reinstall")
