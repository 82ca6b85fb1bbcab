"""Registers ``optimum-cli export ffsplit`` (found by optimum's CLI in this namespace package)."""

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo
from optimum.commands.export.base import ExportCommand


class FFSplitExportCommand(BaseOptimumCLICommand):
    COMMAND = CommandInfo(
        name="ffsplit", help="Export with FFN heavy-hitter splitting and compressed light parts"
    )

    @staticmethod
    def parse_args(parser):
        from ffsplit_export.cli.options import add_export_arguments

        add_export_arguments(parser)

    def run(self):
        import sys

        from ffsplit_export.cli.export import run_export
        from ffsplit_export.errors import FFSplitError

        try:
            run_export(self.args)
        except FFSplitError as e:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(2)


REGISTER_COMMANDS = [(FFSplitExportCommand, ExportCommand)]
