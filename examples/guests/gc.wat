;; Uses WebAssembly GC (its workload sets spec.wasm.features: [gc]): builds a linked list of
;; 100,000 structs on the collector's heap, sums their values, and prints the sum only if it is
;; 1 + 2 + ... + 100000; any other sum traps.
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (type $node (struct (field $value i64) (field $next (ref null $node))))
  (memory (export "memory") 1)
  (data (i32.const 16) "summed a GC list of 100000 structs: 5000050000\n")
  (func $build (param $n i64) (result (ref null $node))
    (local $list (ref null $node))
    (block $done
      (loop $again
        (br_if $done (i64.eqz (local.get $n)))
        (local.set $list (struct.new $node (local.get $n) (local.get $list)))
        (local.set $n (i64.sub (local.get $n) (i64.const 1)))
        (br $again)))
    (local.get $list))
  (func $sum (param $list (ref null $node)) (result i64)
    (local $total i64)
    (block $done
      (loop $again
        (br_if $done (ref.is_null (local.get $list)))
        (local.set $total
          (i64.add (local.get $total) (struct.get $node $value (local.get $list))))
        (local.set $list (struct.get $node $next (local.get $list)))
        (br $again)))
    (local.get $total))
  (func (export "_start")
    (if (i64.ne (call $sum (call $build (i64.const 100000))) (i64.const 5000050000))
      (then unreachable))
    ;; iovec at 0: { buf = 16, len = 47 }
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 47))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
