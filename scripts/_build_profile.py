import cProfile, pstats, time, torch
from hattn.models.presets import preset_config, random_model
torch.ones(1, device="cuda").sum().item()
pr = cProfile.Profile(); t = time.perf_counter(); pr.enable()
random_model(preset_config("qwen3.5-1b"), torch.bfloat16, "cuda"); torch.cuda.synchronize()
pr.disable(); print("from_config", time.perf_counter() - t)
pstats.Stats(pr).sort_stats("tottime").print_stats(15)
pstats.Stats(pr).sort_stats("cumulative").print_stats(30)
