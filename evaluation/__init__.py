"""evaluation: evaluation networks and metrics that need more than pure math.

``gmm`` (few-step evaluation of a student against an exact GMM teacher), ``image_metrics`` (CLIP score,
PickScore, HPSv2, Frechet distance from local weights), ``fid_inception`` (the FID Inception-v3 network).
Pure tensor metrics (coupling error, sliced Wasserstein) stay in ``flowcore.metrics``.
"""
