"""Sampling a token per row on the device: temperature, top_k and top_p and the draw in two Triton launches
(`topk_topp`), beside their torch reference (`reference`)."""

MAX_TOP_K = 256  # the kernel's largest top_k (its candidates must fit one program); larger k: the torch path
