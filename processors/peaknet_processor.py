"""pvapy entry file for the PeakNet processor (the class lives in ``peaknet_pva.pva``).

    pvapy-hpc-consumer -dc -ic pvapy:image -oc 'peaknet:*:output' -sc 'peaknet:*:status' \
        -cc 'peaknet:*:control' -nc 1 -sqs 100 -rp 5 \
        --processor-file processors/peaknet_processor.py --processor-class PeakNetImageProcessor \
        --processor-args "$(cat examples/args/cpu.json)"

Equivalent: ``--processor-class peaknet_pva.PeakNetImageProcessor`` (no file).
"""

from peaknet_pva.pva.peaknet_processor import PeakNetImageProcessor

__all__ = ["PeakNetImageProcessor"]
