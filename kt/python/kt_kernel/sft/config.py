"""``KTConfig``: the ``kt_``-prefixed settings of kt's SFT integration (LLaMA-Factory's ``kt_config`` keys).

Every field may be given explicitly, by a mapping (``KTConfig.from_dict`` / ``KTConfig.build``), or left to
its environment variable ``ACCELERATE_KT_<NAME>`` where NAME is the field name without ``kt_``, upper-case
(``kt_num_threads`` <- ``ACCELERATE_KT_NUM_THREADS``). An explicit value wins over the environment, the
environment over the default. Environment strings are parsed by the field's type: booleans accept
1/0, true/false, yes/no, on/off; ``kt_activation_policy`` accepts JSON (``{"cpu": "retain"}``) or
``cpu=retain,gpu=recompute``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Mapping, Optional

ENV_PREFIX = "ACCELERATE_KT_"

# kt_backend -> the SFT method of KTMoEWrapper(mode="sft"). The original's spellings (INT8, AMXINT8, ...)
# and the SFT method names themselves are both accepted.
_BACKEND_METHODS = {
    "auto": "AMXBF16_SFT",
    "AMXBF16": "AMXBF16_SFT",
    "BF16": "AMXBF16_SFT",
    "INT8": "AMXINT8_SFT",
    "AMXINT8": "AMXINT8_SFT",
    "AMXINT4": "AMXINT4_SFT",
    "AMXINT4_1": "AMXINT4_1_SFT",
    "AMXINT4_KGroup": "AMXINT4_KGroup_SFT",
    "AMXINT4_1KGroup": "AMXINT4_1KGroup_SFT",
}
_NOT_IMPLEMENTED_BACKENDS = ("FP8", "AMXFP8")
_POLICY_VALUES = ("retain", "recompute")


def backend_to_method(backend: str) -> str:
    """The ``KTMoEWrapper(mode="sft")`` method for a ``kt_backend`` value (``AMXBF16`` -> ``AMXBF16_SFT``,
    ``AMXINT8_SkipLoRA`` -> ``AMXINT8_SFT_SkipLoRA``; SFT method names pass through)."""
    from ..experts import SFT_METHODS

    if not isinstance(backend, str):
        raise TypeError(f"kt_backend must be a string, got {type(backend).__name__}")
    if backend in SFT_METHODS:
        return backend
    skip = backend.endswith("_SkipLoRA")
    base = backend[: -len("_SkipLoRA")] if skip else backend
    if base in _NOT_IMPLEMENTED_BACKENDS:
        raise NotImplementedError(f"kt_backend={backend!r}: block-FP8 SFT bases are not implemented in kt yet")
    method = _BACKEND_METHODS.get(base)
    if method is None:
        known = sorted(set(_BACKEND_METHODS) | {k + "_SkipLoRA" for k in _BACKEND_METHODS if k != "auto"})
        raise ValueError(f"kt_backend={backend!r} is not known; expected one of {known} or an SFT method name")
    return method + "_SkipLoRA" if skip else method


def _parse_bool(name: str, text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={text!r}: expected a boolean (1/0, true/false, yes/no, on/off)")


def _parse_policy(name: str, text: str) -> Dict[str, str]:
    text = text.strip()
    if text.startswith("{"):
        value = json.loads(text)
        if not isinstance(value, dict):
            raise ValueError(f"{name}={text!r}: expected a JSON object")
        return value
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, val = part.partition("=")
        if not sep:
            raise ValueError(f"{name}={text!r}: expected JSON or 'cpu=retain|recompute,gpu=retain|recompute'")
        out[key.strip()] = val.strip()
    return out


def _default_policy() -> Dict[str, str]:
    return {"cpu": "recompute", "gpu": "recompute"}


@dataclass
class KTConfig:
    """Settings of kt's SFT integration. Unset fields take ``ACCELERATE_KT_<NAME>`` from the environment.

    Fields kt acts on: ``kt_backend`` (base format of the experts; see ``backend_to_method``),
    ``kt_num_threads`` (CPU worker threads), ``kt_threadpool_count`` (accepted; kt runs one pool),
    ``kt_share_backward_bb``, ``kt_share_cache_pool`` (None: on exactly when CPU activations are recomputed
    under gradient checkpointing, as the original), ``kt_max_cache_depth``, ``kt_model_max_length`` (most
    tokens one MoE call takes: batch x sequence length), ``kt_activation_policy`` (``cpu``: ``recompute``
    runs the experts again in the checkpoint recompute pass, ``retain`` keeps the first forward's result and
    activation cache), ``kt_lora_rank``, ``kt_lora_alpha`` (None: 2 x rank), ``kt_lora_dropout`` (only 0),
    ``kt_group_size`` (KGroup backends), ``kt_lora_init_seed`` (None: torch's global generator),
    ``kt_weight_path`` (None: the experts come from the model's tensors; a Hugging Face model folder or a
    bf16 ``kt convert`` folder: kt reads each layer's experts from it, the model's expert tensors unused),
    ``kt_rank0_experts`` (under torch.distributed with several processes: only rank 0 holds the experts and
    the ranks' tokens go to it, see ``kt_kernel.sft.distributed``; None: on whenever there are several
    processes, as the original; False: every rank holds its own copy).

    Fields accepted for the original callers' configs, checked, and refused when set to something kt does not
    do (NotImplementedError naming the field): ``kt_num_gpu_experts`` (0), ``kt_train_mode`` ("lora"),
    ``kt_use_lora_experts`` (False), ``kt_full_weight_grad`` (False),
    ``kt_expert_checkpoint_path`` (None), ``kt_expert_weight_format``
    ("bf16"), ``kt_weight_lifecycle`` ("persistent"), ``kt_skip_expert_loading`` (False). Recorded without
    effect: ``kt_tp_enabled``, ``kt_non_expert_weight_path``, ``kt_force_fused_expert_lora`` (transformers 5
    experts are always fused), ``kt_lora_expert_num``, ``kt_lora_expert_intermediate_size``,
    ``kt_checkpoint_files``, ``kt_sharded_metadata``, ``kt_wrap_fn``, ``kt_wrap_kwargs``.
    """

    kt_backend: str = "AMXBF16"
    kt_num_threads: int = 1
    kt_tp_enabled: bool = False
    kt_threadpool_count: int = 1
    kt_weight_path: Optional[str] = None
    kt_non_expert_weight_path: Optional[str] = None
    kt_expert_weight_format: str = "bf16"
    kt_weight_lifecycle: str = "persistent"
    kt_expert_checkpoint_path: Optional[str] = None
    kt_num_gpu_experts: int = 0
    kt_skip_expert_loading: bool = False
    kt_share_backward_bb: bool = True
    kt_share_cache_pool: Optional[bool] = None
    kt_force_fused_expert_lora: bool = False
    kt_max_cache_depth: int = 2
    kt_model_max_length: int = 4096
    kt_activation_policy: Dict[str, str] = field(default_factory=_default_policy)
    kt_lora_rank: int = 16
    kt_lora_alpha: Optional[float] = None
    kt_lora_dropout: float = 0.0
    kt_group_size: int = 128
    kt_lora_init_seed: Optional[int] = None
    kt_rank0_experts: Optional[bool] = None
    kt_train_mode: str = "lora"
    kt_full_weight_grad: bool = False
    kt_use_lora_experts: bool = False
    kt_lora_expert_num: int = 0
    kt_lora_expert_intermediate_size: int = 0
    kt_checkpoint_files: Optional[Any] = None
    kt_sharded_metadata: Optional[Any] = None
    kt_wrap_fn: Optional[Any] = None
    kt_wrap_kwargs: Optional[Dict[str, Any]] = None

    def __post_init__(self):
        explicit = getattr(self, "_explicit", frozenset())
        for f in fields(self):
            if f.name in explicit:
                continue
            env = ENV_PREFIX + f.name[len("kt_"):].upper()
            text = os.environ.get(env)
            if text is not None:
                setattr(self, f.name, _from_env(f.name, env, text))
        self._validate()

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "KTConfig":
        """A config from a mapping of field names (``kt_`` prefix optional: ``{"backend": "AMXINT8"}`` and
        ``{"kt_backend": "AMXINT8"}`` are the same). Keys given win over the environment."""
        if not isinstance(values, Mapping):
            raise TypeError(f"kt_config must be a mapping, got {type(values).__name__}")
        names = {f.name for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            name = key if str(key).startswith("kt_") else f"kt_{key}"
            if name not in names:
                raise ValueError(f"kt_config key {key!r} is not a KTConfig field; known: {sorted(names)}")
            kwargs[name] = value
        return cls(**kwargs)

    @classmethod
    def from_object(cls, obj: Any) -> "KTConfig":
        """The config an object carries: a KTConfig itself, a mapping, or an object with a ``kt_config``
        attribute (e.g. LLaMA-Factory's finetuning args or accelerate's plugin) or with ``kt_*`` attributes
        (copied field by field)."""
        if isinstance(obj, KTConfig):
            return obj
        if isinstance(obj, Mapping):
            return cls.from_dict(obj)
        inner = getattr(obj, "kt_config", None)
        if inner is not None and inner is not obj:
            return cls.from_object(inner)
        names = [f.name for f in fields(cls)]
        found = {n: getattr(obj, n) for n in names if hasattr(obj, n)}
        if not found:
            raise TypeError(
                f"cannot build a KTConfig from {type(obj).__name__}: expected a KTConfig, a mapping of kt_* keys, "
                "or an object with a kt_config attribute or kt_* attributes"
            )
        return cls.from_dict(found)

    @classmethod
    def build(cls, kt_config: Any = None) -> "KTConfig":
        """``from_object`` that also takes None (every field from the environment or its default)."""
        return cls() if kt_config is None else cls.from_object(kt_config)

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a plain dict (what the adapter manifest records)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # -- derived values -------------------------------------------------------------------------------------

    @property
    def method(self) -> str:
        """The ``KTMoEWrapper(mode="sft")`` method of ``kt_backend``."""
        return backend_to_method(self.kt_backend)

    @property
    def lora_alpha(self) -> float:
        """``kt_lora_alpha``, or 2 x ``kt_lora_rank`` when unset."""
        return float(2 * self.kt_lora_rank if self.kt_lora_alpha is None else self.kt_lora_alpha)

    @property
    def cpu_policy(self) -> str:
        return self.kt_activation_policy.get("cpu", "recompute")

    def share_cache_pool(self, gradient_checkpointing: bool) -> bool:
        """``kt_share_cache_pool``, or (unset) whether one layer's cache is alive at a time: under gradient
        checkpointing with CPU activations recomputed."""
        if self.kt_share_cache_pool is not None:
            return bool(self.kt_share_cache_pool)
        return bool(gradient_checkpointing) and self.cpu_policy == "recompute"

    # -- validation -----------------------------------------------------------------------------------------

    def _validate(self) -> None:
        self.method  # raises for an unknown or unimplemented backend
        for name in ("kt_num_threads", "kt_threadpool_count", "kt_max_cache_depth", "kt_model_max_length",
                     "kt_lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.kt_activation_policy, Mapping):
            raise TypeError(
                f"kt_activation_policy must be a mapping like {{'cpu': 'recompute', 'gpu': 'recompute'}}, got "
                f"{type(self.kt_activation_policy).__name__}"
            )
        self.kt_activation_policy = {**_default_policy(), **dict(self.kt_activation_policy)}
        for key, value in self.kt_activation_policy.items():
            if key not in ("cpu", "gpu") or value not in _POLICY_VALUES:
                raise ValueError(
                    f"kt_activation_policy[{key!r}]={value!r}: expected keys 'cpu'/'gpu' with values {_POLICY_VALUES}"
                )
        if self.kt_rank0_experts is not None and not isinstance(self.kt_rank0_experts, bool):
            raise TypeError(f"kt_rank0_experts must be None, True or False, got {self.kt_rank0_experts!r}")
        if self.kt_lora_dropout not in (0, 0.0, None):
            raise NotImplementedError(
                f"kt_lora_dropout={self.kt_lora_dropout}: LoRA dropout on the experts is not implemented in kt "
                "(use 0)"
            )
        refused = {
            "kt_num_gpu_experts": (0, "experts on the GPU during SFT"),
            "kt_train_mode": ("lora", "full and hybrid fine-tuning of the experts"),
            "kt_use_lora_experts": (False, "GPU LoRA experts"),
            "kt_full_weight_grad": (False, "base-weight gradients of the experts"),
            "kt_expert_checkpoint_path": (None, "SFT experts read from a checkpoint path"),
            "kt_expert_weight_format": ("bf16", "pre-quantized expert files (use kt_backend to quantize online)"),
            "kt_weight_lifecycle": ("persistent", "ephemeral weight trees"),
            "kt_skip_expert_loading": (False, "skipping the expert loading"),
        }
        for name, (allowed, what) in refused.items():
            value = getattr(self, name)
            if value != allowed:
                raise NotImplementedError(f"{name}={value!r}: {what} is not implemented in kt (use {allowed!r})")


def _from_env(name: str, env: str, text: str):
    """Parses ``text`` of environment variable ``env`` for field ``name`` by the field's default type."""
    default = {f.name: f for f in fields(KTConfig)}[name]
    proto = default.default if default.default is not dataclasses.MISSING else default.default_factory()
    if name == "kt_activation_policy":
        return _parse_policy(env, text)
    if name in ("kt_share_cache_pool", "kt_rank0_experts"):
        return None if text.strip().lower() in ("", "auto", "none") else _parse_bool(env, text)
    if isinstance(proto, bool):
        return _parse_bool(env, text)
    try:
        if isinstance(proto, int):
            return int(text)
        if isinstance(proto, float) or name == "kt_lora_alpha":
            return float(text)
        if name == "kt_lora_init_seed":
            return int(text)
    except ValueError:
        raise ValueError(f"{env}={text!r}: expected a number for {name}") from None
    if name in ("kt_wrap_kwargs", "kt_checkpoint_files", "kt_sharded_metadata"):
        return json.loads(text)
    return text


_dataclass_init = KTConfig.__init__


def _init_recording_explicit(self, *args, **kwargs):
    # The fields named by the caller (positionally or by keyword) are not taken from the environment.
    names = [f.name for f in fields(KTConfig)]
    object.__setattr__(self, "_explicit", frozenset(names[: len(args)]) | frozenset(kwargs))
    _dataclass_init(self, *args, **kwargs)


_init_recording_explicit.__doc__ = _dataclass_init.__doc__
_init_recording_explicit.__signature__ = __import__("inspect").signature(_dataclass_init)
KTConfig.__init__ = _init_recording_explicit
