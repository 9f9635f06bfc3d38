"""The shared vocabulary's reserved code ids: real codes start at N_SPECIAL_CODES. Apart from the
batch (batch.py, which imports torch) so that what only reads a vocabulary (the setup of the wire
protocol, the coordinator's dashboard) loads no torch.
"""

PAD_CODE = 0
MASK_CODE = 1
UNK_CODE = 2
N_SPECIAL_CODES = 3
