import time, cProfile, pstats, io, statistics
import torch
from test_fp8_groups import tiny_fp8, groups, run
from tinymodels import bridge, factories

class NoReplay:
    def replay(self): pass

def test_overhead(capsys):
    torch.set_num_threads(1)
    inp = bridge.random_unet_inputs(0, batch=1, size=8)
    stock = factories.tiny_unet(0)
    f8 = tiny_fp8()
    run(stock, inp); run(f8, inp)
    for g in groups(f8):
        g.graph = NoReplay()
    models = {"stock": stock, "fp8": f8}
    import comfy.model_management as mm
    mm.load_models_gpu(list(models.values()))
    t = {k: [] for k in models}
    with torch.no_grad():
        for _ in range(200):
            for k, m in models.items():
                t0 = time.thread_time()
                bridge.run_comfy_unet(m.model.diffusion_model, inp)
                t[k].append(time.thread_time() - t0)
    with capsys.disabled():
        for k, v in t.items():
            print(k, "%.3f ms" % (1e3 * statistics.median(v)))
        for k, m in models.items():
            pr = cProfile.Profile()
            with torch.no_grad():
                pr.enable()
                for _ in range(20):
                    bridge.run_comfy_unet(m.model.diffusion_model, inp)
                pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
            print(k, s.getvalue()[:5000])
