"""Command-line tools, one module each, all in one idiom: absl flags defined at module level
(snake_case; `--config` is an ml_collections config file with `--config.FIELD=VALUE` overrides),
`main(argv)` calling one library function, and `run()` as the console-script entry point
(`[project.scripts]` in pyproject.toml). Library code and tests never import these modules; they
call the library functions, or run the tools as programs.
"""
