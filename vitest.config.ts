import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Integration tests share kernel state (loop devices, mounts): one file at a time.
    fileParallelism: false,
  },
});
