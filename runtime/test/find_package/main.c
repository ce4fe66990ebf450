/*===- main.c - loads a plan through the l4rt C API ------------------------===*
 *
 * The outside project of the find_package test: loads the plan named on the
 * command line, prints its summary, and runs one greedy generation.
 *
 *===----------------------------------------------------------------------===*/
#include <l4c/runtime/l4rt.h>

#include <stdio.h>

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: l4rt_consumer PLAN\n");
    return 2;
  }
  l4rt_plan plan = NULL;
  if (l4rt_plan_load(argv[1], &plan) != L4RT_OK) {
    fprintf(stderr, "l4rt_consumer: error: %s\n", l4rt_last_error());
    return 1;
  }
  l4rt_plan_summary info;
  l4rt_plan_info(plan, &info);
  printf("program kind: %s\nmax batch: %lld\nmax seq: %lld\nvocab: %lld\n",
         info.program_kind, (long long)info.max_batch, (long long)info.max_seq,
         (long long)info.vocab_size);
  printf("arena: %llu\nweights: %llu\ncache: %llu\n",
         (unsigned long long)info.arena_size,
         (unsigned long long)info.weights_size,
         (unsigned long long)info.cache_size);

  l4rt_session session = NULL;
  if (l4rt_session_create(plan, NULL, 7, &session) != L4RT_OK) {
    fprintf(stderr, "l4rt_consumer: error: %s\n", l4rt_last_error());
    l4rt_plan_free(plan);
    return 1;
  }
  int64_t ids[3] = {1, 2, 3};
  int64_t out[6];
  int64_t len = 0;
  if (l4rt_generate(session, ids, 1, 3, 3, NULL, out, &len) != L4RT_OK) {
    fprintf(stderr, "l4rt_consumer: error: %s\n", l4rt_last_error());
    return 1;
  }
  printf("generated:");
  for (int64_t i = 0; i < len; ++i)
    printf(" %lld", (long long)out[i]);
  printf("\n");
  l4rt_session_free(session);
  l4rt_plan_free(plan);
  return 0;
}
