"""Evaluate pretraining against random initialisations; each check writes Markdown, JSON and PNG.

python scripts/evaluate.py fashion                      # 2D branch on Fashion-MNIST: SwAV and DC-v2 vs random, kNN
python scripts/evaluate.py fashion --seeds 0 1 2        # three pretraining seeds (mean ± std, paired gains)
python scripts/evaluate.py cross-subject --runs R1 R2 R3  # pretraining runs vs random, MNI152 -> Colin27
python scripts/evaluate.py finetune --encoder latest    # fine-tuning: pretrained vs random weights, paired seeds
python scripts/evaluate.py --help                       # every check and option
"""

from ssl3d.evaluate import main

if __name__ == "__main__":
    main()
