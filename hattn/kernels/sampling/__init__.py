"""Sampling a token per row on the device: temperature, top_k and top_p and the draw in two Triton launches
(`topk_topp`), beside their torch reference (`reference`)."""
