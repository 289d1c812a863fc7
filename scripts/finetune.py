"""Fine-tune an exported encoder. With no arguments: MNI152 tissue segmentation (configs/finetune/demo.yaml),
from the latest scripts/pretrain.py encoder and from random weights, printing both.

python scripts/finetune.py                                                   # demo on CPU, a few minutes
python scripts/finetune.py --config configs/finetune/mmwhs_ct.yaml --data.init_args.datalist my_mmwhs.json \
    --model.init_args.encoder runs/pretrain/<run>/encoder
python scripts/finetune.py --print_config                                    # every option, with its value
"""

from ssl3d.finetune.cli import main

if __name__ == "__main__":
    main()
