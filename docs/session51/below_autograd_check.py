import torch, warnings
warnings.filterwarnings("ignore")
torch.set_num_threads(2)
import hattn
from hattn.runtime.breakable import _Capture, watched
from hattn.models.presets import preset_config, random_model
from hattn.models.hf import adapt
from hattn.context import ForwardContext, forward_context
for name in ["tiny", "tiny-qwen3-next", "tiny-kimi-linear", "tiny-minimax", "tiny-nemotron-h", "tiny-olmo-hybrid", "tiny-bailing-hybrid"]:
    try:
        hf = random_model(preset_config(name)); lm = adapt(hf)
    except Exception as e:
        print(name, "build", type(e).__name__, str(e)[:100]); continue
    ids = torch.randint(0, 100, (7,)); pos = torch.arange(7)
    with torch.no_grad(), forward_context(ForwardContext(seq_lens=[4, 3])):
        want = lm(ids, pos)
    for label, ctx in [("no_grad", torch.no_grad), ("grad", torch.enable_grad), ("inference", torch.inference_mode)]:
        cap = _Capture()
        with ctx(), forward_context(ForwardContext(seq_lens=[4, 3])):
            got = watched(cap, lm, (ids, pos))
        g = got if isinstance(got, torch.Tensor) else got[0]
        w = want if isinstance(want, torch.Tensor) else want[0]
        print(name, label, "split calls", cap.split_calls, "max diff", (g.float() - w.float()).abs().max().item(), "requires_grad", g.requires_grad)
# an inductor-compiled function inside the watch, grad enabled, params requiring grad
lin = torch.nn.Linear(8, 8)
f = torch.compile(lambda x: torch.relu(lin(x)) * 2, backend="inductor")
x = torch.randn(3, 8)
want = torch.relu(lin(x)) * 2
for label, ctx in [("no_grad", torch.no_grad), ("grad", torch.enable_grad)]:
    with ctx():
        got = watched(_Capture(), f, (x,))
    print("inductor fn", label, (got - want).abs().max().item())
