"""Files that plug hshelper into build systems, shipped as package data.

Not imported by hshelper: mock/hshelper.py goes into mock's plugin directory,
common/, sbuild/ and pbuilder/ are run inside Debian build chroots, hasher/ holds the
ALT pieces, release/ an example release job. See docs/integrations.md.
"""
