"""Other people's denoising networks as EDM denoisers ``D(x, sigma, labels=None)``."""
