"""Pretrain the joint 2D/3D method. With no arguments: the built-in MNI152 demo (configs/ssl3d/demo.yaml).

python scripts/pretrain.py                                   # demo on CPU, a few minutes
python scripts/pretrain.py --config configs/ssl3d/paper_deepcluster.yaml --data.datalist my_data.json
python scripts/pretrain.py --print_config                     # every option, with its current value
"""

from ssl3d.pretrain import main

if __name__ == "__main__":
    main()
