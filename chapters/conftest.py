"""nbval settings for the chapters: standard error is not compared.

Progress bars (llmbook.utils.progress) and library warnings go to standard error; their
text changes from run to run (timings) and says nothing a chapter claims.
"""

from nbval.plugin import IPyNbFile


def pytest_collectstart(collector):
    if isinstance(collector, IPyNbFile):
        collector.skip_compare += ("stderr",)
