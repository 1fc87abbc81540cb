#!/usr/bin/python3
"""The user's original approach: one FUSE file concatenating N files (fusepy), for losetup.
Usage: fuse_concat.py MOUNTDIR [--big-writes] FILE...   (exposes MOUNTDIR/disk)"""
import errno
import os
import stat
import sys

try:
    from fusepy import FUSE, FuseOSError, Operations  # Debian's python3-fusepy
except ImportError:
    from fuse import FUSE, FuseOSError, Operations


class Concat(Operations):
    def __init__(self, paths):
        self.fds = [os.open(p, os.O_RDWR) for p in paths]
        self.sizes = [os.fstat(fd).st_size for fd in self.fds]
        self.total = sum(self.sizes)

    def getattr(self, path, fh=None):
        if path == '/':
            return {'st_mode': stat.S_IFDIR | 0o755, 'st_nlink': 2}
        if path == '/disk':
            return {'st_mode': stat.S_IFREG | 0o600, 'st_nlink': 1, 'st_size': self.total}
        raise FuseOSError(errno.ENOENT)

    def readdir(self, path, fh):
        return ['.', '..', 'disk']

    def _pieces(self, offset, length):
        index, start = 0, offset
        while length > 0 and index < len(self.sizes):
            if start >= self.sizes[index]:
                start -= self.sizes[index]
                index += 1
                continue
            n = min(length, self.sizes[index] - start)
            yield self.fds[index], start, n
            length -= n
            start = 0
            index += 1

    def read(self, path, size, offset, fh):
        return b''.join(os.pread(fd, n, at) for fd, at, n in self._pieces(offset, size))

    def write(self, path, data, offset, fh):
        done = 0
        for fd, at, n in self._pieces(offset, len(data)):
            os.pwrite(fd, data[done:done + n], at)
            done += n
        return done

    def truncate(self, path, length, fh=None):
        return 0

    def fsync(self, path, datasync, fh):
        for fd in self.fds:
            os.fsync(fd)
        return 0


if __name__ == '__main__':
    args = sys.argv[1:]
    mount = args.pop(0)
    big = '--big-writes' in args
    files = [a for a in args if a != '--big-writes']
    options = {'foreground': True, 'nothreads': False}
    if big:
        options['big_writes'] = True
    FUSE(Concat(files), mount, **options)
