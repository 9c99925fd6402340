"""One-off (session 37): where building the 1B preset on the GPU goes (kernel_profile's from_config took 13-15 s)."""
import cProfile, pstats, time, torch
torch.ones(1, device="cuda").sum().item()
from hattn.models.presets import preset_config, random_model
cfg = preset_config("qwen3.5-1b")
for rnd in range(2):
    pr = cProfile.Profile(); t = time.perf_counter(); pr.enable()
    m = random_model(cfg, torch.bfloat16, "cuda"); torch.cuda.synchronize()
    pr.disable(); print(f"== build round {rnd}: {time.perf_counter() - t:.2f} s", flush=True)
    pstats.Stats(pr).sort_stats("tottime").print_stats(14)
    del m
with torch.device("meta"):
    t = time.perf_counter(); random_model(cfg, torch.bfloat16, "meta"); print(f"== meta build {time.perf_counter() - t:.2f} s")
