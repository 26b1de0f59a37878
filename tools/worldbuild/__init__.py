"""Code that builds the embedded world's models; not part of the installed library.

The tiny teacher is a real (small) Stable-Diffusion-style latent diffusion model in the
standard diffusers layout, trained from scratch on :mod:`condistill.world.scenes`
(``tools/pretrain_teacher.py`` wires the pieces together; the saved folder loads with plain
``diffusers.StableDiffusionPipeline`` and needs no condistill import):

* :mod:`worldbuild.tokenizer`: a CLIP byte-level BPE in which every scene word is one token;
* :mod:`worldbuild.architecture`: the networks' sizes and their diffusers/transformers builders;
* :mod:`worldbuild.training`: the VAE phase and the UNet + text-encoder phase;
* :mod:`worldbuild.parallel`: the whole run, in one or several data-parallel processes;
* :mod:`worldbuild.saving`: the diffusers folder, written and read back;
* :mod:`worldbuild.heuristic`: a judge-free pixel check of generated images.

Shared by the teacher and judge scripts: :mod:`worldbuild.render` (scenes rendered into
arrays) and :mod:`worldbuild.cli` (command lines made from config dataclasses).
"""
