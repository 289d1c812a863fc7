"""Entity discovery in captioned videos through bipartite agreement graphs.

"Self-Contained Entity Discovery from Captioned Videos" (Ayoughi, Mettes, Groth): name the people on screen from
a video and its subtitles alone. ``discover`` runs the three stages (bipartite entity-name graphs, visual
entity agreement, prototype refinement) on face embeddings, weak names and frames; ``records_from_video``
builds those inputs from a video and its subtitle file; ``load_records`` reads them from JSON or Parquet.
"""

from entities.metrics import evaluate, evaluate_expected, stage_table
from entities.names import UNKNOWN, Gazetteer, caption_names
from entities.pipeline import OFFICIAL_OPTIONS, DiscoveryOptions, DiscoveryResult, discover, discover_records
from entities.records import FaceRecords, RecordsError, load_records, save_records
from entities.selftrain import LinearEntityHead
from entities.subtitles import CaptionLine, SubtitleError, parse_subtitles
from entities.synthetic import EpisodeConfig, make_episode

__all__ = [
    "OFFICIAL_OPTIONS",
    "UNKNOWN",
    "CaptionLine",
    "DiscoveryOptions",
    "DiscoveryResult",
    "EpisodeConfig",
    "FaceRecords",
    "Gazetteer",
    "LinearEntityHead",
    "RecordsError",
    "SubtitleError",
    "caption_names",
    "discover",
    "discover_records",
    "evaluate",
    "evaluate_expected",
    "load_records",
    "make_episode",
    "parse_subtitles",
    "save_records",
    "stage_table",
]
