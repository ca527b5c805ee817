"""What users run: the embedded lab, the transfer scenario and its strategies, the CLI.

The tool's package, not the library's: an application imports ``coordinator`` and
``participants`` (their public API), never this, which may change in any release.
"""
