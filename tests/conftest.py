import torch

# The test models are tiny: one thread is faster than several competing ones.
torch.set_num_threads(1)
