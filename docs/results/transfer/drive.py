import json, sys, time, dataclasses
import torch
torch.set_num_threads(1)
from cblr_ext.experiments.transfer import PROTOCOL, selection_specs, select, held_out_specs, evaluate
from cblr_ext.experiments.sweep import run_all
def main():
    out = sys.argv[1]
    config = PROTOCOL if len(sys.argv) < 3 else dataclasses.replace(PROTOCOL, epochs=int(sys.argv[2]))
    t = time.time()
    grids = selection_specs(config)
    specs = [s for g in grids.values() for ss in g.values() for s in ss]
    print("selection runs", len(specs), flush=True)
    runs = run_all(specs, 2, "selection", True)
    sel = select(config, runs)
    json.dump({"selection": sel, "wall_s": time.time() - t}, open(f"{out}/selection.json", "w"), default=str, indent=1)
    print("selection done", time.time() - t, flush=True)
    held = held_out_specs(config, sel["choice"])
    runs.update(run_all([s for ss in held.values() for s in ss], 2, "held-out", True))
    res = {"selection": sel, "held_out": evaluate(config, sel["choice"], runs), "wall_s": time.time() - t}
    json.dump(res, open(f"{out}/transfer.json", "w"), default=str, indent=1)
    slim = [{"spec": r["spec"], **{k: r[k] for k in ("val_acc", "test_acc", "train_acc", "diverged", "wall_s", "steps")}} for r in runs.values()]
    json.dump(slim, open(f"{out}/runs.json", "w"), indent=1)
    print("done", time.time() - t, flush=True)

if __name__ == '__main__':
    main()
