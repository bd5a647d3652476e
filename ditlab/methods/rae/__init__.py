"""RAE: Diffusion Transformers with Representation Autoencoders (Zheng, Ma, Tong, Xie, 2025; code bytetriper/RAE).

A frozen representation encoder (DINOv2, SigLIP2, MAE; on the digits and scenes ditlab's own digits ViT and scene
CLIP) is the latent space: its standardised patch tokens ``(F, g, g)``. A ViT decoder trained with noise-augmented
inputs maps them back to pixels. The DiT trains in that space with the noise-schedule shift by latent dimension and,
optionally, the wide shallow DDT head.

- :mod:`.encoders`: the frozen encoder kinds (local weights only; one line when they are missing);
- :mod:`.autoencoder`: the :class:`RAE` (encoder + statistics + decoder), saved as a folder, with a VAE's calls;
- :mod:`.train`: decoder training (``python -m ditlab.methods.rae.train --config configs/rae_decoder.yaml``), cached
  per recipe like ditlab's other self-trained networks;
- :mod:`.shift`: ``sqrt(latent_dim / base_dim)`` and the shifted flow objective;
- :mod:`.ddt`: the DDT head (block kind ``ddt-head``, trunk kind ``ddt``; registered on import);
- :mod:`.module`: :class:`RAEModule`, the ``DiffusionModule`` of ``configs/rae.yaml``.

``ditlab encode SOURCE --encoder RAE_FOLDER --out DIR`` writes RAE latents as shards that ``LatentDataModule`` reads.
A checkpoint records the RAE folder as its ``vae`` (scale 1); ``ditlab sample``/``eval`` decode through it
(``ditlab.data.vae.load_vae`` reads RAE folders).
"""

from ditlab.methods.rae import ddt  # noqa: F401 - registers the ddt-head block and the ddt trunk
from ditlab.methods.rae.autoencoder import RAE, ViTDecoder, is_rae_folder, load_rae
from ditlab.methods.rae.encoders import rae_encoder
from ditlab.methods.rae.shift import ShiftedFlowMatching, dimension_shift, shift_time

__all__ = ["RAE", "ShiftedFlowMatching", "ViTDecoder", "dimension_shift", "is_rae_folder", "load_rae", "rae_encoder",
           "shift_time"]  # fmt: skip
