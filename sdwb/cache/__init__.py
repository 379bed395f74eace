"""Training-free acceleration methods (``sdwb compress cache``): DeepCache and Token Merging.

A method is one module here with its typed config and its applier (:mod:`sdwb.cache.registry`,
the pattern of :mod:`sdwb.quant`): :mod:`sdwb.cache.deepcache` (our implementation of DeepCache's
schedule on diffusers' UNet blocks) and :mod:`sdwb.cache.tome` (the ``tomesd`` package).
:mod:`sdwb.cache.config` parses configs, applies a method to a loaded pipeline (what
``sdwb.loading`` does for a variant whose ``sdwb.json`` has ``stage: cache``) and holds the
refusals every verb shares. In the core because the loader must re-apply a recorded method.
"""
