// The scheduler's pure logic: host states, claims and their ledger, filters, weighers, and the
// decision. No Kubernetes I/O: the scheduling controller feeds it from informer caches and writes
// the binding.
export * from './filters.ts';
export * from './host-state.ts';
export * from './ledger.ts';
export * from './request.ts';
export * from './scheduler.ts';
export * from './volume-placement.ts';
export * from './weighers.ts';
