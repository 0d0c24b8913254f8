"""diffusers networks as trajflow Teachers.

``conditions`` (PromptCondition, UNetCondition: a leaf), ``common`` (placement, config/dtype helpers),
``text_encoders`` (each pipeline's own ``encode_prompt``), ``sd3`` (DiffusersFlowTeacher), ``unet``
(DiffusersUNetTeacher through ``flowcore.vp_flow``), ``schedulers`` (the corrected few-step schedulers a
stock pipeline loads), ``vae`` (a pipeline folder's VAE as a latent decoder: the trainer's sample grids). Imports run downwards only: conditions/common <- text_encoders <- sd3/unet.
"""
