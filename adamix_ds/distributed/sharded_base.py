"""The frozen base model under ZeRO-3: created or loaded already partitioned, gathered layer by layer.

Design (see docs/architecture.md): a ZeRO-3 engine partitions every parameter
in its module, trainable or not, with the optimizer state. The mixtures must stay whole and
replicated, so they are kept out of the ZeRO-managed tree: the base alone is created under
zero.Init (through transformers' HfDeepSpeedConfig) and DeepSpeed's ZeRO-3 parameter coordinator
(DeepSpeedZeRoOffload) is attached to it to gather each layer's weights just before it runs, in
forward and in backward. The mixtures hook onto the base's modules from outside.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from .. import distributed
from ..arguments import ModelArguments
from ..config import ConfigError
from .ds_config import AUTO, LAYER_SIZED, resolve_layer_sized
from .host_memory import return_freed_memory
from .quantized_weights import detach_from_checkpoint, keep_storage_layout, quantized_linears
from .sharded import full_numel, gathered

logger = logging.getLogger(__name__)


@dataclass
class ShardedBase:
    """The base model and what keeps it partitioned; hold it for the model's lifetime."""

    model: PreTrainedModel
    stage: int
    device: torch.device
    _keepalive: list = field(default_factory=list, repr=False)

    @property
    def partitioned(self) -> bool:
        return self.stage == 3

    @contextlib.contextmanager
    def whole(self) -> Iterator[PreTrainedModel]:
        """The base to generate with. Partitioned, ZeRO-3's coordinator gathers every layer again for each new
        token; where a whole copy fits every rank's free memory (with half of it to spare), each weight is gathered
        once into a plain copy for the whole generation instead. Otherwise (replicated, quantized, or too large)
        the model itself."""
        if not self.partitioned or quantized_linears(self.model) or not whole_copy_fits(self.model, self.device):
            yield self.model
            return
        self.release_gathered()
        yield whole_copy(self.model, self.device)

    def release_gathered(self) -> None:
        """Wait for the coordinator's prefetches and partition every weight it holds gathered. Needed before
        weights are gathered outside a forward (the export): the prefetch that follows a forward's trace into the
        backward an evaluation never runs leaves weights in flight, which DeepSpeed cannot gather again."""
        for item in self._keepalive:
            if hasattr(item, "empty_partition_cache"):
                item.empty_partition_cache()


def whole_copy_fits(model: torch.nn.Module, device: torch.device) -> bool:
    """Every rank agrees (collective) that a whole copy of `model` takes at most half of its free memory: the
    device's, or on a CPU its share of the host's (the ranks on one host each make a copy)."""
    need = sum(full_numel(p) * p.element_size() for p in model.parameters())
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        host = socket.gethostname()
        free = psutil.virtual_memory().available / distributed.all_gather_objects(host).count(host)
    short = torch.tensor([0.0 if 2 * need <= free else 1.0], dtype=torch.float64)
    return distributed.all_reduce_sum(short).item() == 0


@torch.no_grad()
def whole_copy(model: PreTrainedModel, device: torch.device) -> PreTrainedModel:
    """A plain (unpartitioned) copy of a ZeRO-3 model in eval mode, each weight in its own dtype: each module's
    weights gathered once (one all-gather per module, every rank together), buffers copied as they are, tied weights
    tied again."""
    with torch.device("meta"):
        replica = type(model)(copy.deepcopy(model.config))
    sources = dict(model.named_modules())
    for name, module in replica.named_modules():
        source = sources[name]
        own = dict(source.named_parameters(recurse=False))
        if own:
            with gathered(own.values()):
                for key, param in own.items():
                    module._parameters[key] = torch.nn.Parameter(param.data.to(device, copy=True),
                                                                 requires_grad=False)
        for key, buffer in source.named_buffers(recurse=False):
            module._buffers[key] = buffer.to(device, copy=True)
    replica.tie_weights()
    replica.generation_config = model.generation_config
    return replica.eval()


def _from_source(model_args: ModelArguments, dtype: torch.dtype, vocab_size: int,
                 device: torch.device | None = None) -> PreTrainedModel:
    """The base in `dtype`; quantized as --quantization_bit asks, onto `device` (None: the current device, where
    transformers puts a quantized model when ZeRO-3 forbids a device map)."""
    source = model_args.source
    quantization = model_args.quantization_config(dtype)
    if source.builtin:
        model = AutoModelForCausalLM.from_config(source.config(vocab_size=vocab_size), dtype=dtype,
                                                 **model_args.loading_options())
    elif source.is_gguf:
        model = source.load(dtype, **model_args.pretrained_options())
    else:
        return _pretrained(source.location, model_args, dtype, quantization, device)
    if quantization is None:
        return model
    with tempfile.TemporaryDirectory(prefix="adamix_ds-base-") as directory:
        # bitsandbytes quantizes weights as from_pretrained loads them, so a base drawn or dequantized in memory is
        # written out first. Every rank writes its own copy (save_pretrained writes on rank 0 only).
        model.config.save_pretrained(directory)
        save_model(model, f"{directory}/model.safetensors", metadata={"format": "pt"})
        del model
        return _pretrained(directory, model_args, dtype, quantization, device)


def _pretrained(name: str, model_args: ModelArguments, dtype: torch.dtype, quantization,
                device: torch.device | None) -> PreTrainedModel:
    options = model_args.pretrained_options()
    if quantization is not None:
        options["quantization_config"] = quantization
        if device is not None:
            options["device_map"] = {"": device}
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **options)


def load_base(model_args: ModelArguments, ds_config: dict, vocab_size: int, seed: int,
              trainable: bool = False) -> ShardedBase:
    """Build or load the base partitioned under ZeRO-3 (ceil(numel / W) elements per rank).

    Frozen (the mixture methods), it gets the parameter coordinator here; trainable (--method full), a
    DeepSpeed engine takes it over instead.
    """
    from deepspeed.accelerator import get_accelerator

    dtype = torch.bfloat16 if ds_config["bf16"]["enabled"] else torch.float32
    stage = ds_config["zero_optimization"]["stage"]
    device = torch.device(get_accelerator().device_name(distributed.local_rank()))
    if device.type == "cpu" and stage == 3:  # for the gathers; elsewhere it only slows every allocation
        return_freed_memory()
    keep = []
    if any(ds_config["zero_optimization"].get(key) == AUTO for key in LAYER_SIZED):
        resolve_layer_sized(ds_config, decoder_layer_numel(model_args, vocab_size))
    torch.manual_seed(seed)
    # transformers creates neither a quantized model nor one read from GGUF under zero.Init: every rank loads the
    # whole base and the coordinator partitions it below (4-bit weights are stored in `dtype`, as ZeRO-3 needs). A
    # built-in base is drawn whole first, to be quantized as it loads.
    if stage == 3 and model_args.quantization_bit is None and not model_args.source.is_gguf:
        from transformers.integrations import HfDeepSpeedConfig

        keep.append(HfDeepSpeedConfig(ds_config))  # transformers keeps only a weak reference
    model = _from_source(model_args, dtype, vocab_size, device=None if stage == 3 else device)
    keep_storage_layout(model)
    if not trainable:
        model.requires_grad_(False)
        if stage == 3:
            coordinator = _attach_coordinator(model, ds_config)
            keep += [coordinator, _reset_per_decoder_forward(model, coordinator)]
        elif not quantized_linears(model):  # a quantized base was loaded onto the device already
            model.to(device)
        elif device.type == "cpu":
            detach_from_checkpoint(model)
    return ShardedBase(model=model, stage=stage, device=device, _keepalive=keep)


def decoder_layer_numel(model_args: ModelArguments, vocab_size: int) -> int:
    """Parameters of the model's largest decoder layer, counted on a weightless (meta-device) copy."""
    config = model_args.source.config(model_args.trust_remote_code, vocab_size)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
    return largest_layer_numel(model)


def largest_layer_numel(model: torch.nn.Module) -> int:
    """Parameters of the largest block in the model's longest module list (its decoder layers); the whole model
    where it has none."""
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not stacks:
        return sum(p.numel() for p in model.parameters())
    return max(sum(p.numel() for p in layer.parameters()) for layer in max(stacks, key=len))


def require_activation_checkpointing(model: PreTrainedModel) -> None:
    """--gradient_checkpointing needs a model class that supports it (checked on the weightless copy in preflight,
    and here for hub models, which preflight does not build)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"--gradient_checkpointing: {type(model).__name__} does not support activation "
                          "checkpointing")


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute every decoder layer in the backward. Non-reentrant: the mixtures' hooks run again inside the
    recomputation with the forward's random state, so tensors they save need no special care."""
    require_activation_checkpointing(model)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        model.disable_input_require_grads()  # it adds this hook, which only the reentrant variant needs
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _attach_coordinator(model: torch.nn.Module, ds_config: dict):
    """DeepSpeed's ZeRO-3 parameter coordinator on the base alone, configured from zero_optimization."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.utils.timer import NoopTimer

    config = DeepSpeedConfig(ds_config)
    zero = config.zero_config
    return DeepSpeedZeRoOffload(
        model,
        timers=NoopTimer(),
        ds_config=ds_config,  # the dict: it partitions a model not created under zero.Init (a quantized one) with it
        overlap_comm=zero.overlap_comm,
        prefetch_bucket_size=zero.prefetch_bucket_size,
        max_reuse_distance=zero.max_reuse_distance,
        max_live_parameters=zero.max_live_parameters,
        param_persistence_threshold=zero.param_persistence_threshold,
        model_persistence_threshold=zero.model_persistence_threshold,
        offload_param_config=zero.offload_param,
    )


def _reset_per_decoder_forward(model: torch.nn.Module, coordinator) -> list:
    """Start a new coordinator step whenever the decoder runs on its own.

    DeepSpeed starts a step (resets its fetch counters, completes the recorded module trace that
    drives prefetching) when the forward of the module it was given starts. The training and eval
    losses call the decoder (model.base_model) directly and apply the output projection in chunks,
    so without this every step would extend one endless trace: no prefetch, and each layer's
    gather in backward waited for synchronously. Calls through the whole model reset once, as before.
    """
    decoder = getattr(model, "base_model", model)
    if decoder is model:
        return []
    inside_model = [False]

    def enter(*_args) -> None:
        inside_model[0] = True

    def leave(*_args) -> None:
        inside_model[0] = False

    def decoder_starts(*_args) -> None:
        if not inside_model[0]:
            coordinator.get_param_coordinator().reset_step()

    return [model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True),
            decoder.register_forward_pre_hook(decoder_starts)]
