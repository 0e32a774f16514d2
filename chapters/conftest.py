"""nbval settings for the chapters: standard error and SVG figures are not compared.

Progress bars (llmbook.utils.progress) and library warnings go to standard error; their
text changes from run to run (timings) and says nothing a chapter claims.

Figures are SVG, and an SVG carries every plotted coordinate to six decimals, which move
in the last digits between CPUs' kernels. nbval already leaves PNG and JPEG figures out of
the comparison for the same reason; a checked cell's claims are in its printed text and its
assertions, which are compared and run.
"""

from nbval.plugin import IPyNbFile


def pytest_collectstart(collector):
    if isinstance(collector, IPyNbFile):
        collector.skip_compare += ("stderr", "image/svg+xml")
