"""What a model card says about running a GGUF, read from the file itself: the maximum
context, the recommended sampling settings, whether the chat template has a thinking
switch, and the memory llama.cpp's KV cache takes at a given context.

The converter writes these keys from the checkpoint's `config.json` and
`generation_config.json` (`general.sampling.*` come from the latter), so reading them back
from the published file keeps the card and the file in agreement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qatgguf.errors import ModelCardError

# ref: llama.cpp common/common.h: the KV cache is F16 unless -ctk/-ctv say otherwise, and
# a batch is split into micro-batches of n_ubatch = 512 tokens.
KV_TYPE_SIZE = 2
DEFAULT_UBATCH = 512
# ref: llama.cpp src/llama-context.cpp (cparams.n_ctx = GGML_PAD(n_ctx, 256)) and
# src/llama-kv-cache-iswa.cpp (the SWA cache "is always padded to 256").
KV_PAD = 256
_THINKING_RE = re.compile(r"\benable_thinking\b")


def _pad(n: int, to: int = KV_PAD) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class ModelFacts:
    """The runtime facts of one text GGUF (see `read_model_facts`)."""

    path: str
    arch: str
    context_length: int
    n_layer: int
    n_head_kv: tuple[int, ...]  # per layer
    key_length: int
    value_length: int
    key_length_swa: int
    value_length_swa: int
    sliding_window: int | None
    swa_layers: tuple[bool, ...]  # per layer; all False without sliding-window attention
    shared_kv_layers: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    chat_template: str | None = None

    @property
    def thinking_switch(self) -> bool:
        """Whether the chat template reads `enable_thinking` (llama.cpp passes it with
        `--chat-template-kwargs`)."""
        return self.chat_template is not None and bool(_THINKING_RE.search(self.chat_template))

    @property
    def kv_layers(self) -> int:
        """Layers that keep their own K/V; the last `shared_kv_layers` reuse earlier ones.
        ref: llama.cpp src/models/gemma4.cpp load_arch_hparams (n_layer_kv_from_start) and
        src/llama-hparams.cpp has_kv."""
        return self.n_layer - self.shared_kv_layers

    def kv_cells(self, ctx: int, *, swa: bool, n_ubatch: int = DEFAULT_UBATCH) -> int:
        """Cells one layer's cache holds at context `ctx` (one sequence).
        ref: llama.cpp src/llama-kv-cache-iswa.cpp: size_swa = GGML_PAD(min(size_base,
        n_swa + n_ubatch), 256); size_base is the context padded to 256."""
        base = _pad(ctx)
        if swa and self.sliding_window:
            return _pad(min(base, self.sliding_window + n_ubatch))
        return base

    def kv_cache_bytes(
        self, ctx: int, *, n_ubatch: int = DEFAULT_UBATCH, type_size: int = KV_TYPE_SIZE
    ) -> int:
        """Bytes of llama.cpp's KV cache at context `ctx`:
        sum over layers with their own K/V of cells(layer) * n_head_kv(layer) *
        (key_length(layer) + value_length(layer)) * type_size.
        ref: llama.cpp src/llama-hparams.cpp n_embd_k_gqa/n_embd_v_gqa (per-layer head
        sizes: *_swa on sliding layers), src/llama-kv-cache.cpp (one K and one V tensor
        of n_embd_gqa x cells per layer)."""
        if ctx < 1:
            raise ModelCardError(f"{self.path}: KV cache context must be >= 1, got {ctx}")
        total = 0
        for il in range(self.kv_layers):
            swa = self.swa_layers[il]
            k = self.key_length_swa if swa else self.key_length
            v = self.value_length_swa if swa else self.value_length
            total += self.kv_cells(ctx, swa=swa, n_ubatch=n_ubatch) * self.n_head_kv[il] * (k + v)
        return total * type_size

    def kv_formula(self, *, n_ubatch: int = DEFAULT_UBATCH, type_size: int = KV_TYPE_SIZE) -> str:
        """The formula of `kv_cache_bytes` with this model's numbers, in words."""
        groups: dict[tuple[bool, int, int, int], int] = {}
        for il in range(self.kv_layers):
            swa = self.swa_layers[il]
            key = (
                swa,
                self.n_head_kv[il],
                self.key_length_swa if swa else self.key_length,
                self.value_length_swa if swa else self.value_length,
            )
            groups[key] = groups.get(key, 0) + 1
        terms = []
        for (swa, heads, k, v), n in sorted(groups.items()):
            kind = "sliding-window" if swa else "global"
            cells = f"min(ctx, {self.sliding_window} + {n_ubatch})" if swa else "ctx"
            terms.append(
                f"{n} {kind} layer{'s' if n > 1 else ''} × {heads} KV head{'s' if heads > 1 else ''}"
                f" × ({k} + {v}) × {cells}"
            )
        text = f"KV cache bytes = {type_size} × [" + " + ".join(terms) + "]"
        text += ", with cell counts rounded up to a multiple of 256"
        if self.shared_kv_layers:
            text += (
                f"; the last {self.shared_kv_layers} of the {self.n_layer} layers reuse the K/V "
                "of earlier layers and add nothing"
            )
        return text + "."


def _field(fields: dict[str, Any], key: str) -> Any:
    f = fields.get(key)
    if f is None:
        return None
    value = f.contents()
    return value


def read_model_facts(path: str | Path) -> ModelFacts:
    """Read the runtime facts from a GGUF's metadata (the first file of a split set).

    Raises ModelCardError naming the file and the missing or malformed key.
    """
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise ModelCardError(f"{path}: cannot read GGUF metadata: {exc}") from None
    fields = reader.fields
    arch = _field(fields, "general.architecture")
    if not isinstance(arch, str):
        raise ModelCardError(f"{path}: no general.architecture; is this a model GGUF?")

    def need(key: str) -> Any:
        value = _field(fields, f"{arch}.{key}")
        if value is None:
            raise ModelCardError(
                f"{path}: metadata key {arch}.{key} is missing; the card needs it to state "
                "the context and memory; re-convert the file with qatgguf"
            )
        return value

    n_layer = int(need("block_count"))
    head_kv = need("attention.head_count_kv")
    n_head_kv = tuple(int(x) for x in head_kv) if isinstance(head_kv, list) else (int(head_kv),) * n_layer
    if len(n_head_kv) != n_layer:
        raise ModelCardError(
            f"{path}: {arch}.attention.head_count_kv has {len(n_head_kv)} entries for "
            f"{n_layer} layers; it must hold one per layer"
        )
    key_length = int(need("attention.key_length"))
    value_length = int(need("attention.value_length"))
    window = _field(fields, f"{arch}.attention.sliding_window")
    pattern = _field(fields, f"{arch}.attention.sliding_window_pattern")
    if pattern is None:
        swa_layers = (window is not None,) * n_layer
    else:
        swa_layers = tuple(bool(x) for x in pattern)
        if len(swa_layers) != n_layer:
            raise ModelCardError(
                f"{path}: {arch}.attention.sliding_window_pattern has {len(swa_layers)} "
                f"entries for {n_layer} layers"
            )
    k_swa = _field(fields, f"{arch}.attention.key_length_swa")
    v_swa = _field(fields, f"{arch}.attention.value_length_swa")
    shared = int(_field(fields, f"{arch}.attention.shared_kv_layers") or 0)
    if not 0 <= shared < n_layer:
        raise ModelCardError(
            f"{path}: {arch}.attention.shared_kv_layers={shared} is not in [0, {n_layer})"
        )

    def opt(key: str, kind: type) -> Any:
        value = _field(fields, key)
        return None if value is None else kind(value)

    return ModelFacts(
        path=str(path),
        arch=arch,
        context_length=int(need("context_length")),
        n_layer=n_layer,
        n_head_kv=n_head_kv,
        key_length=key_length,
        value_length=value_length,
        key_length_swa=int(k_swa) if k_swa is not None else key_length,
        value_length_swa=int(v_swa) if v_swa is not None else value_length,
        sliding_window=int(window) if window is not None else None,
        swa_layers=swa_layers,
        shared_kv_layers=shared,
        # general.sampling.* are float32 in the file: six significant digits give back
        # the value of generation_config.json (0.95, not 0.949999988).
        temperature=_round(opt("general.sampling.temp", float)),
        top_p=_round(opt("general.sampling.top_p", float)),
        top_k=opt("general.sampling.top_k", int),
        min_p=_round(opt("general.sampling.min_p", float)),
        chat_template=opt("tokenizer.chat_template", str),
    )


def _round(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.6g}")
