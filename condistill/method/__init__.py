"""The method: pure tensor functions of single-stage conditional distillation.

- :mod:`~condistill.method.schedule`: the teacher's VP schedule, the skip grid, boundary
  scalings, prediction conversions, the DDIM step and the consistency function;
- :mod:`~condistill.method.guidance`: classifier-free guidance as a model wrapper;
- :mod:`~condistill.method.losses`: the CoDi consistency + regression loss and the plain
  diffusion loss of the baselines;
- :mod:`~condistill.method.sampler`: the few-step sampler as plain functions;
- :mod:`~condistill.method.codi_scheduler`: the same sampler as a diffusers scheduler class.
"""
