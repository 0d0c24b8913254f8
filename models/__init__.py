"""models: the network families of trajflow as Teachers (no Ray, no object storage, no trainer/pipeline/CLI).

Modules: ``gmm`` (analytic Gaussian mixtures and their presets), ``flownet`` (small flow nets: network,
fitting, safetensors I/O, the Teacher adapter), ``diffusers`` (SD3-class transformer and SD1.5/SD2/SDXL
UNet adapters, their condition batches, text encoders and schedulers), ``tiny`` (tiny random-weight
networks and pipeline folders for tests and dry runs), ``spec`` (teacher SPEC strings), ``registry``
(the ONE place that turns a SPEC or a card's teacher record into a Teacher) and ``cache`` (the local cache
root, ``$TRAJFLOW_CACHE``).
"""
