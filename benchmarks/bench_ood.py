"""OOD gate speeds: scoring throughput (batch 1 and 64) and training steps/s of the autoencoder and ALI at 64 px.

One torch thread (the CPU is shared). Scoring = reconstruction + all four scorers (L1, L2, 1 - SSIM,
latent norm) per image; "files" adds reading and preprocessing the 256 px dev PNGs.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from _common import parse_args, peak_rss_mb, timed, write_table  # noqa: E402

from cxrbench.data import load_manifest, shared_data_root  # noqa: E402
from cxrbench.models.ali import ALI, ali_train_step, make_ali_optimizers  # noqa: E402
from cxrbench.models.autoencoder import ConvAutoencoder, ae_train_step  # noqa: E402
from cxrbench.models.bundle import Bundle, ModelCard  # noqa: E402
from cxrbench.ood.scoring import OOD_PREPROCESS, score_batch, score_files  # noqa: E402

LATENT, WIDTH, TRAIN_BATCH = 128, 16, 32


def main() -> None:
    args = parse_args(__doc__)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = []
    models = {"autoencoder": ConvAutoencoder(LATENT, WIDTH), "ali": ALI(LATENT, WIDTH)}
    for name, model in models.items():
        model.eval()
        for batch in (1, 64):
            x = torch.rand(batch, 1, 64, 64)
            n_calls = max(1, 64 // batch)
            med, best = timed(lambda: [score_batch(model, x) for _ in range(n_calls)], args.repeat)
            rows.append({"model": name, "step": f"score tensors, batch {batch}", "median_s": med, "min_s": best,
                         "images_per_s": batch * n_calls / med})
    x = torch.rand(TRAIN_BATCH, 1, 64, 64)
    ae = ConvAutoencoder(LATENT, WIDTH)
    opt = torch.optim.Adam(ae.parameters(), lr=1e-3)
    steps = 5
    med, best = timed(lambda: [ae_train_step(ae, opt, x) for _ in range(steps)], args.repeat)
    rows.append({"model": "autoencoder", "step": f"train step, batch {TRAIN_BATCH}", "median_s": med / steps,
                 "min_s": best / steps, "images_per_s": TRAIN_BATCH * steps / med})
    ali = ALI(LATENT, WIDTH)
    opt_d, opt_g = make_ali_optimizers(ali)
    gen = torch.Generator().manual_seed(0)
    med, best = timed(lambda: [ali_train_step(ali, opt_d, opt_g, x, halt_threshold=None, generator=gen)
                               for _ in range(steps)], args.repeat)
    rows.append({"model": "ali", "step": f"train step (D + E/G), batch {TRAIN_BATCH}", "median_s": med / steps,
                 "min_s": best / steps, "images_per_s": TRAIN_BATCH * steps / med})

    root = shared_data_root()
    if root is not None:
        files = load_manifest(root / "cxr" / "nih")["path"].tolist()[:128]
        card = ModelCard(kind="ood", builder="autoencoder",
                         builder_kwargs={"latent_dim": LATENT, "base_channels": WIDTH},
                         preprocess=OOD_PREPROCESS.to_dict(),
                         ood={"cutoff": {"scorer": "ssim", "threshold": 0.4, "method": "benchmark"}})
        bundle = Bundle(models["autoencoder"], card)
        med, best = timed(lambda: score_files(bundle, files, batch_size=64), args.repeat)
        rows.append({"model": "autoencoder", "step": f"ood-score {len(files)} NIH PNG files (read + preprocess)",
                     "median_s": med, "min_s": best, "images_per_s": len(files) / med})
    rows.append({"model": "", "step": "peak RSS (MB)", "median_s": peak_rss_mb(), "min_s": float("nan"),
                 "images_per_s": float("nan")})
    write_table(rows, args.out, "ood")


if __name__ == "__main__":
    main()
