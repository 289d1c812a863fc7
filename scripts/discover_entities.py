"""Name the people on screen from a video and its subtitles alone (or face records, or the synthetic episode).

python scripts/discover_entities.py                        # built-in synthetic episode, prints the stage table
python scripts/discover_entities.py --video ep.avi --subtitles ep.srt --names.cast '[Ross, Rachel, Monica]'
python scripts/discover_entities.py --records faces.json   # JSON or Parquet face records
python scripts/discover_entities.py --print_config          # every option, with its current value
"""

from entities.cli import main

if __name__ == "__main__":
    main()
