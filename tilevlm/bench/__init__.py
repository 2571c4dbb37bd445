"""`tilevlm bench`: speed with random weights (speed.py), against peers on the same weights
(peer_*.py), the GEMM roofline and the timing rules both sides share."""
