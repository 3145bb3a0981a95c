"""pvapy entry file for the CXI writer processor (the class lives in ``peaknet_pva.pva``).

    pvapy-hpc-consumer -dc -ic 'peaknet:*:output' -sc 'cxi:*:status' -cc 'cxi:*:control' \
        -nc 1 -sqs 1000 -rp 5 \
        --processor-file processors/cxi_processor.py --processor-class CxiFileProcessor \
        --processor-args "$(cat examples/args/cxi-writer.json)"

Run the writer set with the same ``-nc`` as the PeakNet set: writer k reads ``peaknet:k:output``.
"""

from peaknet_pva.pva.cxi_processor import CxiFileProcessor

__all__ = ["CxiFileProcessor"]
