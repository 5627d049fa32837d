;; An idle GC sandbox: allocates one struct (so that it has a GC heap, as every GC guest has),
;; keeps it in a global, then sleeps for an hour in poll_oneoff.
(module
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (type $cell (struct (field (mut i64))))
  (global $kept (mut (ref null $cell)) (ref.null $cell))
  (memory (export "memory") 1)
  (func (export "_start")
    (global.set $kept (struct.new $cell (i64.const 1)))
    ;; subscription at 0 (48 bytes): userdata u64, tag u8 = 0 (clock),
    ;; clock: id u32 at 16 = 1 (monotonic), timeout u64 at 24, precision u64 at 32, flags u16 at 40
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 3600000000000))
    (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 128)))))
