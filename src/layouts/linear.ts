// `linear`: the device is the plain concatenation of the files, in manifest order.

import { chunkSlots, placeSlot, type Geometry, type Layout } from './layout.js';

export function createLinearLayout(geometry: Geometry): Layout {
  const slots = chunkSlots(geometry);
  return { place: (chunk) => placeSlot(slots, geometry.chunkSize, chunk) };
}
