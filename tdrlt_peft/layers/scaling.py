"""``AdapterScaling``: the per-adapter scale API that diffusers (and PEFT's LoRA users) call on adapter layers.

diffusers calls, on every ``BaseTunerLayer`` of a model (``diffusers/utils/peft_utils.py``, ``loaders/peft.py``):

* ``set_scale(adapter, weight)``: the adapter's scale becomes ``weight`` times its configured scale (LoRA:
  ``weight * alpha / r``; TDLRT: ``weight * TuckerAdapterConfig.scale``) — ``set_adapters(names, weights)``;
* ``scale_layer(weight)`` / ``unscale_layer(weight)``: multiply / divide the scale of every active adapter
  (``cross_attention_kwargs={"scale": w}`` around one forward, ``fuse_lora(lora_scale=w)``);
  ``unscale_layer(None)`` restores the configured scale;
* ``len(layer.r)`` (the number of adapters, for default adapter names).

TDLRT's scale of adapter ``a`` is ``layer.tdlrt_scale[a]`` (a float used by the forward and by ``merge``). The
configured value is recorded on first use of these methods, before any change.
"""

from __future__ import annotations


class AdapterScaling:
    """Mixin of ``TDLRTLayer``: ``r``, ``set_scale``, ``scale_layer``, ``unscale_layer`` (LoRA's semantics)."""

    @property
    def r(self) -> dict[str, int]:
        """Adapter -> current rank (matrix adapters: the shared rank; Tucker: the largest over the adaptive modes;
        ``tdrlt_peft.adapter_ranks`` gives every mode's)."""
        ranks = {}
        for adapter in self.tdlrt_S:
            stored = self.tdlrt_rank[adapter].tolist()    # the rank buffer (a host read), not the forward's width
            ranks[adapter] = max(r for r, f in zip(stored, self.factorized_modes()) if f)
        return ranks

    def configured_scale(self, adapter: str) -> float:
        """The scale the adapter was created with (``TuckerAdapterConfig.scale``)."""
        configured = self.__dict__.setdefault("_tdlrt_configured_scale", {})
        return configured.setdefault(adapter, self.tdlrt_scale[adapter])

    def set_scale(self, adapter: str, scale: float) -> None:
        """Scale of ``adapter`` := ``scale`` x its configured scale (ignored for an adapter this layer lacks)."""
        if adapter not in self.tdlrt_scale:
            return
        self.tdlrt_scale[adapter] = float(scale) * self.configured_scale(adapter)

    def scale_layer(self, scale: float) -> None:
        """Multiply the current scale of every active adapter by ``scale``."""
        if scale == 1:
            return
        for adapter in self._scaled_adapters():
            self.tdlrt_scale[adapter] *= float(scale)

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divide the current scale of every active adapter by ``scale``; None restores the configured scale."""
        for adapter in self._scaled_adapters():
            if scale is None:
                self.tdlrt_scale[adapter] = self.configured_scale(adapter)
            else:
                self.tdlrt_scale[adapter] /= float(scale)

    def delete_adapter(self, adapter_name: str) -> None:
        self.__dict__.get("_tdlrt_configured_scale", {}).pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    def _scaled_adapters(self) -> list[str]:
        """Active adapters of this layer, with their configured scale recorded before any change."""
        adapters = [a for a in self.active_adapters if a in self.tdlrt_scale]
        for adapter in adapters:
            self.configured_scale(adapter)
        return adapters
