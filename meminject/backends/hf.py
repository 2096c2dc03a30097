"""The ``hf`` backend: the plain Hugging Face modules, hooked only at the memories' sites.

Why: every forward through ``TransformerBridge`` passes its per-component wrappers
and hook points, about a fifth of the time of a GPT-2-small step on CPU, even when
no hook is set. Generation needs none of that: it only needs the memories' hook
bodies to see, at their sites, the activation the bridge would have shown them.

**One copy of the weights.** The plain model is assembled on the meta device from
the checkpoint's config, and every parameter and buffer it has is then *the bridge's
own tensor* (the same storage, not a copy), so it costs no weight memory. In processed
coordinates the bridge has folded and centred those tensors in place, so the plain
model computes in processed coordinates too; the one exception is a fused
query/key/value projection (GPT-2's ``c_attn``, GPT-NeoX's ``query_key_value``), which
the bridge leaves stale while it computes with split ``q``/``k``/``v`` copies. The
processed split weights are written back into the fused tensor in place (it is not
read by the bridge's processed forward), so both paths compute from the same numbers.

Its activations relate to the bridge's by a map per site, which is *measured, not
assumed*: on a probe sequence both models run, and the site is used only if one of
these maps reproduces the bridge's activation within tolerance:

* ``identity``: the same numbers (the usual case, now that the weights are shared);
* ``centre``: the bridge's value is the raw one minus its mean over ``d_model``;
* ``offset``: the bridge's value is the raw one minus a constant (``attn_z`` with
  value biases folded into the output bias).

A body returns the new activation in bridge coordinates; the plain model gets
``raw + (new - old)``. Anything unverified (another site, a plugin's hook point, a
parallel-attention block's ``resid_mid``) is reported by ``unsupported``, and ``auto``
falls back to the bridge.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meminject.backends import BackendUnavailable, Body, Step
from meminject.sites import SiteInfo, parse_hook_name

if TYPE_CHECKING:
    import torch
    from jaxtyping import Float
    from torch import Tensor

    from meminject.model_handle import LoadedModel


def _served(name: str) -> tuple[SiteInfo, int] | None:
    parsed = parse_hook_name(name)
    return parsed if parsed is not None and parsed[0].plain is not None else None


@dataclass(frozen=True)
class SiteMap:
    """How the plain model's activation at a site becomes the bridge's."""

    kind: str  # "identity", "centre" or "offset"
    offset: Tensor | None = None  # subtracted, for kind "offset"
    error: float = 0.0  # the largest difference measured on the probe

    def to_bridge(self, raw: Tensor) -> Tensor:
        if self.kind == "centre":
            return raw - raw.mean(dim=-1, keepdim=True)
        if self.kind == "offset":
            assert self.offset is not None
            return raw - self.offset
        return raw


def _apply(site_map: SiteMap, body: Body, raw: Tensor) -> Tensor:
    if site_map.kind == "identity":
        return body(raw)
    old = site_map.to_bridge(raw)
    new = body(old.clone())  # a body that edits in place must not erase the difference
    return raw + (new - old)


@dataclass(frozen=True)
class _BlockModules:
    block: Any
    attn: Any
    attn_out_proj: Any
    mlp: Any
    mlp_out_proj: Any
    #: What each sublayer adds to the residual stream: the module itself, or the norm
    #: applied to its output first (Gemma 2/3's post-attention and post-MLP norms).
    attn_contribution: Any
    mlp_contribution: Any


def _first(output: Any) -> Any:
    return output[0] if isinstance(output, tuple) else output


def _replace_first(output: Any, value: Tensor) -> Any:
    return (value, *output[1:]) if isinstance(output, tuple) else value


@dataclass(frozen=True)
class BlockPaths:
    """Where a plain model keeps each block's modules (names from the bridge's
    component mapping), so the backend can find them with or without the bridge."""

    blocks: str
    attn: str
    attn_o: str
    mlp: str
    mlp_out: str
    #: Gemma 2/3's norms on the attention and MLP outputs, inside each block.
    ln1_post: str | None = None
    ln2_post: str | None = None

    @classmethod
    def of_bridge(cls, bridge: Any) -> BlockPaths:
        mapping = getattr(bridge.adapter, "component_mapping", None) or {}
        try:
            spec = mapping["blocks"]
            subs = spec.submodules
            attn, mlp = subs["attn"], subs["mlp"]
            return cls(
                blocks=spec.name,
                attn=attn.name,
                attn_o=attn.submodules["o"].name,
                mlp=mlp.name,
                mlp_out=mlp.submodules["out"].name,
                ln1_post=subs["ln1_post"].name if "ln1_post" in subs else None,
                ln2_post=subs["ln2_post"].name if "ln2_post" in subs else None,
            )
        except (KeyError, AttributeError, TypeError) as exc:
            raise BackendUnavailable(
                f"the plain model's blocks could not be matched to the bridge's ({exc!r})"
            ) from exc

    def to_json(self) -> dict[str, str | None]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BlockPaths:
        fields: dict[str, Any] = {k: data.get(k) for k in cls.__dataclass_fields__}
        return cls(**fields)


class HFBackend:
    """The plain Hugging Face model standing in for a loaded bridge."""

    name = "hf"
    features = frozenset({"kv_cache", "padded_batch", "python_hooks"})

    def __init__(
        self,
        loaded: LoadedModel,
        hf_model: Any,
        paths: BlockPaths,
        maps: Mapping[str, SiteMap | str] | None = None,
    ):
        self.loaded = loaded
        self.hf = hf_model
        self.paths = paths
        self.parallel = loaded.facts.parallel_attn_mlp
        self._blocks = self._find_blocks()
        #: hook name → verified map, or why it failed; a served snapshot brings its own.
        self._maps: dict[str, SiteMap | str] = dict(maps or {})
        self.logits_error: float | None = None  # measured on the probe

    @classmethod
    def build(cls, loaded: LoadedModel) -> HFBackend:
        """The plain model over the bridge's own weight tensors, its logits checked
        against the bridge's on a probe (the registry's factory caches it on the model)."""
        if not loaded.has_bridge:
            raise BackendUnavailable("the model was loaded without a bridge or a plain model")
        backend = cls(loaded, shared_hf_model(loaded), BlockPaths.of_bridge(loaded.bridge))
        backend._check_logits()
        return backend

    def unsupported(self, hook_name: str) -> str | None:
        try:
            self.site_map(hook_name)
        except BackendUnavailable as exc:
            return str(exc)
        return None

    def _find_blocks(self) -> list[_BlockModules]:
        paths = self.paths
        found = []
        try:
            for block in self.hf.get_submodule(paths.blocks):
                attn = block.get_submodule(paths.attn)
                mlp = block.get_submodule(paths.mlp)
                found.append(
                    _BlockModules(
                        block=block,
                        attn=attn,
                        attn_out_proj=attn.get_submodule(paths.attn_o),
                        mlp=mlp,
                        mlp_out_proj=mlp.get_submodule(paths.mlp_out),
                        attn_contribution=(
                            block.get_submodule(paths.ln1_post) if paths.ln1_post else attn
                        ),
                        mlp_contribution=(
                            block.get_submodule(paths.ln2_post) if paths.ln2_post else mlp
                        ),
                    )
                )
        except (AttributeError, TypeError) as exc:
            raise BackendUnavailable(
                f"the plain model's blocks could not be matched to the bridge's ({exc!r})"
            ) from exc
        if len(found) != self.loaded.dims.n_layers:
            raise BackendUnavailable("the plain model has a different number of blocks")
        return found

    # -- hooks ---------------------------------------------------------------------

    @contextmanager
    def hooks(
        self, bodies: Mapping[str, Body], maps: Mapping[str, SiteMap] | None = None
    ) -> Iterator[None]:
        """Install ``bodies`` (bridge hook name → body) on the plain model for the block."""
        handles: list[Any] = []
        try:
            for name, body in bodies.items():
                site_map = maps[name] if maps is not None else self.site_map(name)
                handles.extend(self._install(name, body, site_map))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _install(self, name: str, body: Body, site_map: SiteMap) -> list[Any]:
        served = _served(name)
        if served is None:
            raise BackendUnavailable(f"hook point '{name}' has no plain-model equivalent")
        info, layer = served
        assert info.plain is not None
        role, how = info.plain
        mods = self._blocks[layer]
        module = getattr(mods, role)

        def on_output(module: Any, args: Any, output: Any) -> Any:
            return _replace_first(output, _apply(site_map, body, _first(output)))

        def on_input(module: Any, args: Any, kwargs: Any) -> Any:
            if args:
                return (_apply(site_map, body, args[0]), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = _apply(site_map, body, kwargs["hidden_states"])
            return args, kwargs

        if how == "input":
            return [module.register_forward_pre_hook(on_input, with_kwargs=True)]
        if how == "output":
            return [module.register_forward_hook(on_output)]
        if how == "heads_input":
            return [self._install_z(module, body, site_map)]
        return self._install_resid_mid(mods.block, module, body, site_map)

    def _install_z(self, out_proj: Any, body: Body, site_map: SiteMap) -> Any:
        n_heads = self.loaded.dims.n_heads

        def per_head(flat: Float[Tensor, "batch pos heads_x_d_head"]) -> Tensor:
            heads = flat.reshape(*flat.shape[:2], n_heads, -1)
            return _apply(site_map, body, heads).reshape(flat.shape)

        def on_input(module: Any, args: Any, kwargs: Any) -> Any:
            return (per_head(args[0]), *args[1:]), kwargs

        return out_proj.register_forward_pre_hook(on_input, with_kwargs=True)

    def _install_resid_mid(
        self, block: Any, attn_contribution: Any, body: Body, site_map: SiteMap
    ) -> list[Any]:
        """resid_mid = resid_pre + attn_out in a sequential block, so a change to it is a
        change to the attention output; the block's input is kept to read it."""
        if self.parallel:
            raise BackendUnavailable("a parallel-attention block has no resid_mid to hook")
        seen: list[Tensor] = []

        def keep_input(module: Any, args: Any, kwargs: Any) -> None:
            seen[:] = [args[0] if args else kwargs["hidden_states"]]

        def on_attn(module: Any, args: Any, output: Any) -> Any:
            attn_out = _first(output)
            mid = seen[0] + attn_out
            return _replace_first(output, attn_out + (_apply(site_map, body, mid) - mid))

        return [
            block.register_forward_pre_hook(keep_input, with_kwargs=True),
            attn_contribution.register_forward_hook(on_attn),
        ]

    # -- verification ----------------------------------------------------------------

    def probe(self) -> Tensor:
        import torch

        dims = self.loaded.dims
        n = min(12, dims.n_ctx)
        ids = (torch.arange(n) * 7919 + 13) % dims.d_vocab
        return ids.unsqueeze(0).to(self.loaded.device)

    def tolerance(self, reference: Tensor) -> float:
        import torch

        rel = 1e-4 if self.loaded.dtype == torch.float32 else 2e-2
        return rel * (1.0 + float(reference.abs().max()))

    def _check_logits(self) -> None:
        import torch

        probe = self.probe()
        with torch.no_grad():
            ours = torch.log_softmax(self.hf(probe, use_cache=False).logits.float(), -1)
            theirs = torch.log_softmax(self.loaded.bridge(probe, return_type="logits").float(), -1)
        error = float((ours - theirs).abs().max())
        if error > self.tolerance(theirs.exp()) * 10:
            raise BackendUnavailable(
                f"the plain model's next-token log-probabilities differ from the bridge's "
                f"by {error:.2e} on a probe"
            )
        self.logits_error = error

    def site_map(self, name: str) -> SiteMap:
        """The verified map for one hook point, measured on the probe the first time."""
        if name not in self._maps:
            self.measure([name])
        known = self._maps[name]
        if isinstance(known, str):
            raise BackendUnavailable(known)
        return known

    def measure(self, names: list[str]) -> dict[str, SiteMap | str]:
        """Measure the maps of ``names`` not yet known, all in one run of each model."""
        import torch

        todo = [n for n in dict.fromkeys(names) if n not in self._maps]
        ready = []
        for name in todo:
            served = _served(name)
            if served is None:
                self._maps[name] = f"hook point '{name}' has no plain-model equivalent"
            elif served[0].plain == ("attn_contribution", "resid_mid") and self.parallel:
                self._maps[name] = "a parallel-attention block has no resid_mid to hook"
            elif not self.loaded.has_bridge:
                self._maps[name] = (
                    f"hook point '{name}' was not verified when the model's served snapshot "
                    "was made"
                )
            else:
                ready.append(name)
        if ready:
            probe = self.probe()
            captured: dict[str, Tensor] = {}

            def recorder(name: str) -> Body:
                def record(activation: Tensor) -> Tensor:
                    captured[name] = activation.detach().float()
                    return activation

                return record

            identity = {name: SiteMap("identity") for name in ready}
            with torch.no_grad():
                _, cache = self.loaded.bridge.run_with_cache(probe, names_filter=ready)
                with self.hooks({name: recorder(name) for name in ready}, maps=identity):
                    self.hf(probe, use_cache=False)
            for name in ready:
                self._maps[name] = self._fit(name, cache, captured.get(name))
        return {name: self._maps[name] for name in names}

    def _fit(self, name: str, cache: Any, raw: Tensor | None) -> SiteMap | str:
        """The map that turns the plain model's activation into the bridge's, if one does."""
        if name not in cache or raw is None:
            return f"hook point '{name}' did not fire on the probe"
        site = parse_hook_name(name)
        assert site is not None
        reference = cache[name].float()
        if reference.shape != raw.shape:
            return f"hook point '{name}' has shape {tuple(raw.shape)} in the plain model"
        candidates = [SiteMap("identity")]
        if site[0].writes_residual:
            candidates.append(SiteMap("centre"))
        if site[0].width == "heads":  # attn_z: value biases folded into the output bias
            offset = (raw - reference).mean(dim=(0, 1)).to(self.loaded.dtype)
            candidates.append(SiteMap("offset", offset))
        tolerance = self.tolerance(reference)
        best = min(
            (
                SiteMap(c.kind, c.offset, float((c.to_bridge(raw) - reference).abs().max()))
                for c in candidates
            ),
            key=lambda c: c.error,
        )
        if best.error > tolerance:
            return (
                f"the plain model's activation at '{name}' does not match the bridge's "
                f"(best map '{best.kind}' is off by {best.error:.2e})"
            )
        return best

    def known_maps(self) -> dict[str, SiteMap | str]:
        """Every map measured so far (what a served snapshot records)."""
        return dict(self._maps)

    # -- running ---------------------------------------------------------------------

    def forward(self, step: Step) -> tuple[Float[Tensor, "batch pos d_vocab"], Any]:
        out = self.hf(
            step.tokens,
            past_key_values=step.past,
            use_cache=step.use_cache,
            attention_mask=step.attention_mask,
            position_ids=step.position_ids,
        )
        return out.logits, out.past_key_values if step.use_cache else None


def shared_hf_model(loaded: LoadedModel) -> Any:
    """A plain ``AutoModelForCausalLM`` whose every parameter and buffer is the bridge's
    tensor of the same name (no weight is copied; built on the meta device first)."""
    import copy

    source = loaded.bridge.original_model
    originals = _original_modules(source)
    plain = plain_on_meta(copy.deepcopy(source.config), loaded.dtype)
    for name, module in plain.named_modules(remove_duplicate=False):
        theirs = originals.get(name)
        if theirs is None:
            raise BackendUnavailable(f"the bridge has no module '{name}' to share weights with")
        wanted = {k for k, v in module._parameters.items() if v is not None} | {
            k for k, v in module._buffers.items() if v is not None
        }
        have = set(theirs._parameters) | set(theirs._buffers)
        if not wanted <= have:
            missing = sorted(wanted - have)[0]
            raise BackendUnavailable(f"the bridge has no tensor '{name}.{missing}' to share")
        for key, tensor in theirs._parameters.items():
            module._buffers.pop(key, None)
            module._parameters[key] = tensor
        for key, tensor in theirs._buffers.items():
            module._parameters.pop(key, None)
            module._buffers[key] = tensor
            if key in theirs._non_persistent_buffers_set:
                module._non_persistent_buffers_set.add(key)
    if loaded.coordinates == "processed":
        _refresh_fused_qkv(loaded)
    still_meta = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if still_meta:
        raise BackendUnavailable(f"the plain model's '{still_meta[0]}' has no weights to share")
    return plain.eval()


def plain_on_meta(config: Any, dtype: torch.dtype) -> Any:
    """``AutoModelForCausalLM`` of ``config`` on the meta device (no memory), with
    transformers' default attention (sdpa) where the architecture has it: the probe
    checks it against the bridge's eager attention."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            try:
                return AutoModelForCausalLM.from_config(
                    config, dtype=dtype, attn_implementation="sdpa"
                )
            except ValueError:
                return AutoModelForCausalLM.from_config(
                    config, dtype=dtype, attn_implementation="eager"
                )
    except (ValueError, KeyError, TypeError) as exc:
        raise BackendUnavailable(f"could not rebuild the plain model from its config: {exc}") from (
            None
        )


def _original_modules(source: Any) -> dict[str, Any]:
    """The Hugging Face modules inside the bridge, by their name in a plain model (the
    bridge wraps each one it touches, as ``<name>._original_component``)."""
    out: dict[str, Any] = {}
    for name, module in source.named_modules(remove_duplicate=False):
        if "_original_component" in getattr(module, "_modules", {}):
            continue  # a bridge wrapper; its original is listed under the same plain name
        plain_name = name.replace("._original_component", "").removesuffix("_original_component")
        out[plain_name.rstrip(".")] = module
    return out


def _refresh_fused_qkv(loaded: LoadedModel) -> None:
    """Write the bridge's processed split q/k/v weights back into the fused projection
    they were split from, in place (see the module docstring)."""
    import torch

    dims = loaded.dims
    fused_blocks = []
    for block in loaded.bridge.blocks:
        parts: list[Any] = [getattr(block.attn, k, None) for k in ("q", "k", "v", "qkv")]
        if all(getattr(p, "original_component", None) is not None for p in parts):
            fused_blocks.append([p.original_component for p in parts])
    if fused_blocks:
        # The legacy fingerprint hashes the weights as loaded, the stale fused tensors
        # included; taken before they change, it stays what older memory files recorded.
        loaded.legacy_fingerprint()
    for q, k, v, fused in fused_blocks:
        with torch.no_grad():
            if type(fused).__name__ == "Conv1D":  # GPT-2: x @ W, W = [d_in, q | k | v]
                fused.weight.copy_(torch.cat([q.weight.T, k.weight.T, v.weight.T], dim=1))
                if fused.bias is not None:
                    fused.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
            elif isinstance(fused, torch.nn.Linear):  # GPT-NeoX: per head, [q; k; v]
                n, d_head = dims.n_heads, fused.weight.shape[0] // (3 * dims.n_heads)
                w = torch.stack([t.weight.reshape(n, d_head, -1) for t in (q, k, v)], dim=1)
                fused.weight.copy_(w.reshape(fused.weight.shape))
                if fused.bias is not None:
                    b = torch.stack([t.bias.reshape(n, d_head) for t in (q, k, v)], dim=1)
                    fused.bias.copy_(b.reshape(fused.bias.shape))
            else:
                raise BackendUnavailable(
                    f"the fused attention projection {type(fused).__name__} has no known layout"
                )
