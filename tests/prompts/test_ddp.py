import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback

from prompts.data import FewShotDataModule
from prompts.module import PromptSRC
from tests.prompts.tiny import TINY, make_image_folder


class _SavePrompts(Callback):
    def __init__(self, folder):
        self.folder = str(folder)

    def on_train_end(self, trainer, module):
        state = {k: v.detach().clone() for k, v in module.model.prompt_parameters().items()}
        state["epochs"] = torch.tensor(module.aggregator.epochs)
        torch.save(state, f"{self.folder}/rank{trainer.global_rank}.pt")


@pytest.mark.distributed
def test_two_process_cpu_ddp(tmp_path):
    root = make_image_folder(tmp_path / "data", per_split=(4, 1, 1))
    pl.seed_everything(0)
    model = PromptSRC(model_name=TINY, text_depth=2, vision_depth=2, gpa_mean=1.5, lr=0.05)
    data = FewShotDataModule("imagefolder", str(root), num_shots=4, seed=1, subsample="all", batch_size=2)
    initial = {k: v.detach().clone() for k, v in model.model.prompt_parameters().items()}
    trainer = pl.Trainer(
        strategy="ddp_spawn",
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[_SavePrompts(tmp_path)],
    )
    trainer.fit(model, datamodule=data)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["epochs"].tolist() == [1, 2]
    for name, value in ranks[0].items():
        torch.testing.assert_close(ranks[1][name], value, rtol=0, atol=0)  # replicas agree, GPA included
        if name != "epochs":
            assert not torch.equal(value, initial[name])  # and training moved them
