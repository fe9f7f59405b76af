"""Serving adapter (LoRA) versions: base + adapter on both policy engines.

An adapter version (manifest kind "adapter", see `rlhf.models.adapters`) is a version of the
served model name whose directory holds peft's `adapter_config.json` + `adapter_model.safetensors`
and names its base version (`extra["base"]`, with the sha256 of the base's weight files). The
engines serve it on top of that base:

- `adapter_version(model_dir)` (from `rlhf.models.adapters`, re-exported here): None for a full
  version; for an adapter, its base directory
  (resolved and checked by `rlhf.models.adapters.adapter_base`: a missing base or one whose
  weights differ from the checksums the adapter names raises `UnsafeCheckpoint`, so the swapper
  refuses the version) and its LoRA rank.
- transformers (`AdapterHost`): one base model with peft adapters loaded into it by name
  (`PeftModel.load_adapter`); each adapter version is served through an `AdapterView`, the
  host's model with that adapter active. A swap to another adapter of the same base loads only
  the adapter's tensors beside the serving one; the base is never reloaded. A host lock makes
  "activate this adapter, run this forward" one step, so the serving adapter's batches and the
  candidate's golden probes (another thread) never see each other's adapter. Adapters no
  request uses any more are deleted at the next load.
- vLLM: the engine runs on the base with `enable_lora=True`; each request carries the
  `LoRARequest` of the version it is pinned to (see `vllm.py`).
"""

from __future__ import annotations

import itertools
import threading
import weakref
from pathlib import Path

# `adapter_version` lives with the adapter format (the reward and reference services use it too)
from rlhf.models.adapters import AdapterVersion, adapter_version  # noqa: F401 - re-exported


def same_dir(a: Path | None, b: Path | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


# ------------------------------------------------------------------------------------------------
# transformers: one base, many peft adapters
# ------------------------------------------------------------------------------------------------


class AdapterHost:
    """One base model (never reloaded while its adapters serve) and the peft adapters in it."""

    def __init__(self, base_dir: Path, base_model, adapter_dir: Path):
        """Wrap `base_model` (taken over: peft injects its LoRA layers into it) with a first
        adapter; `view(name)` of `first` serves it."""
        from peft import PeftModel

        self.base_dir = Path(base_dir)
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._views: dict[str, weakref.ref] = {}
        self.first = self._name()
        self.peft = PeftModel.from_pretrained(base_model, str(adapter_dir), adapter_name=self.first,
                                              is_trainable=False, strict_adapter_check="error")
        self.peft.eval()
        self.peft.requires_grad_(False)
        self.model = self.peft.get_base_model()  # the transformers model, LoRA layers inside
        self._active: str | None = self.first
        self.base_loaded = None  # engine-specific: what the engine knows of the base (hf: _Loaded)

    def _name(self) -> str:
        return f"v{next(self._ids)}"  # a module-dict key: no dots

    def add(self, adapter_dir: Path) -> str:
        """Load another adapter beside the serving ones (the base stays); returns its name."""
        name = self._name()
        with self._lock:
            try:
                self.peft.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False,
                                       strict_adapter_check="error")
            except BaseException:
                self._delete([name])
                raise
            self.peft.requires_grad_(False)
            self._delete([n for n, ref in self._views.items() if ref() is None])
        return name

    def _delete(self, names: list[str]) -> None:
        for n in names:
            self._views.pop(n, None)
            if n in self.peft.peft_config:
                self.peft.delete_adapter(n)
        self._active = None  # peft picks another active adapter when the active one goes

    def view(self, name: str) -> "AdapterView":
        v = AdapterView(self, name)
        with self._lock:
            self._views[name] = weakref.ref(v)
        return v

    def adapters(self) -> list[str]:
        """Adapters loaded now (tests: unused ones are dropped at the next load)."""
        return sorted(self.peft.peft_config)

    def forward(self, name: str, *args, **kwargs):
        with self._lock:
            if self._active != name:
                self.peft.set_adapter(name)
                self.peft.requires_grad_(False)
                self._active = name
            return self.model(*args, **kwargs)


class AdapterView:
    """The host's model with one adapter active: stands in for the model of a `_Loaded`."""

    def __init__(self, host: AdapterHost, name: str):
        self.host = host
        self.adapter = name

    def __call__(self, *args, **kwargs):
        return self.host.forward(self.adapter, *args, **kwargs)

    def __getattr__(self, attr):  # config, generation_config, parameters(), ...
        return getattr(self.host.model, attr)
