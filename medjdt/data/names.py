"""Names the command line offers before anything heavy is imported: dataset layouts and unlabelled-case policies."""

LAYOUTS = ("qubiq", "lits", "kits19", "kits21", "kits23", "demo", "folders")
UNLABELLED_POLICIES = ("error", "skip", "include")
