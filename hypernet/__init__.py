"""difflora: hypernet (autoencoder + DiT denoiser over adapter tokens; train, sample, evaluate, predict).

The diffusers-facing API is imported on first use (``import hypernet.train`` stays light):

>>> from hypernet import personalize
>>> me = personalize(pipe, ["me1.jpg", "me2.jpg"], hypernet="assets/tiny/hypernet", scale=1.0)
>>> image = pipe(me.prompt).images[0]
>>> me.remove()
"""

from __future__ import annotations

from weights.lazy import lazy_exports

_EXPORTS = {"Personalization": "personalizer", "Personalizer": "personalizer", "personalize": "personalizer"}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
