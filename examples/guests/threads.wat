;; Uses threads (its workload sets spec.wasm.features: [threads], on a node that offers them):
;; `_start` spawns four threads with wasi-threads' `thread-spawn`; each sums a quarter of
;; 1 + 2 + ... + 4,000,000 and adds it to a shared total with an atomic add, then counts
;; itself done and wakes the main thread, which waits with `memory.atomic.wait32`. The main
;; thread prints the total only if it is 8000002000000; any other total traps.
;;
;; Memory layout: 0: the total (i64); 8: threads still summing (i32); 16: an iovec; 64: the
;; message. The memory is imported, shared and exported, as `wasm32-wasip1-threads` toolchains
;; build it.
(module
  (import "env" "memory" (memory 1 1 shared))
  (export "memory" (memory 0))
  (import "wasi" "thread-spawn" (func $thread_spawn (param i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (data (i32.const 64) "summed 1..4000000 on 4 threads: 8000002000000\n")

  ;; The sum of $from + ... + $to.
  (func $sum (param $from i64) (param $to i64) (result i64)
    (local $total i64)
    (block $done
      (loop $again
        (br_if $done (i64.gt_u (local.get $from) (local.get $to)))
        (local.set $total (i64.add (local.get $total) (local.get $from)))
        (local.set $from (i64.add (local.get $from) (i64.const 1)))
        (br $again)))
    (local.get $total))

  ;; Thread $part (0 to 3) sums 1,000,000 numbers from $part * 1,000,000 + 1.
  (func (export "wasi_thread_start") (param $id i32) (param $part i32)
    (local $from i64)
    (local.set $from (i64.mul (i64.extend_i32_u (local.get $part)) (i64.const 1000000)))
    (drop (i64.atomic.rmw.add (i32.const 0)
      (call $sum
        (i64.add (local.get $from) (i64.const 1))
        (i64.add (local.get $from) (i64.const 1000000)))))
    (drop (i32.atomic.rmw.sub (i32.const 8) (i32.const 1)))
    (drop (memory.atomic.notify (i32.const 8) (i32.const 1))))

  (func (export "_start")
    (local $part i32)
    (local $left i32)
    (i32.atomic.store (i32.const 8) (i32.const 4))
    (loop $spawn
      (if (i32.lt_s (call $thread_spawn (local.get $part)) (i32.const 1))
        (then unreachable))
      (local.set $part (i32.add (local.get $part) (i32.const 1)))
      (br_if $spawn (i32.lt_u (local.get $part) (i32.const 4))))
    (block $done
      (loop $wait
        (local.set $left (i32.atomic.load (i32.const 8)))
        (br_if $done (i32.eqz (local.get $left)))
        (drop (memory.atomic.wait32 (i32.const 8) (local.get $left) (i64.const -1)))
        (br $wait)))
    (if (i64.ne (i64.atomic.load (i32.const 0)) (i64.const 8000002000000))
      (then unreachable))
    ;; iovec { buf: 64, len: 46 }; bytes written at 24.
    (i32.store (i32.const 16) (i32.const 64))
    (i32.store (i32.const 20) (i32.const 46))
    (drop (call $fd_write (i32.const 1) (i32.const 16) (i32.const 1) (i32.const 24)))))
